# FlashNorm development environment. Use:  source setup_env.sh
#
# Creates .venv (with pip in it), installs flashnorm in editable mode with its dev extra (tests, Hugging Face,
# Lightning, tutorials, docs, mypy: what .ci/run needs) and activates it. Afterwards `pip install x` installs
# into .venv. Nothing is installed into the system's or the user's Python.
# * The venv comes from `python3 -m venv`, or from `uv venv --seed` where python3 has no ensurepip (Debian
#   without python3-venv) and uv is on PATH.
# * Installs: uv where it is on PATH (fast; it reads no pip configuration, so pip's find-links are handed to
#   it), else the venv's own pip (which reads pip's configuration); both install into .venv only.
# * A machine whose python3 already imports torch (a GPU user's CUDA build) keeps it and its Triton: the venv
#   sees the system site-packages and the venv's pip (which, unlike uv, counts them as installed) adds the rest.
# * Otherwise the CPU build torch==2.13.0 is installed with Triton 3.6 (the kernels' interpreter) and numpy < 2.4
#   (which that interpreter needs), from pip's configured find-links when there are some, else torch from
#   PyTorch's CPU index (an unpinned torch from PyPI is a multi-GB CUDA build).
_flashnorm_setup() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)" || return 1
    local venv="$root/.venv"
    local python="$venv/bin/python"
    local -a site_args=()
    local system_torch=0
    if python3 -c "import torch" >/dev/null 2>&1; then
        system_torch=1
        site_args=(--system-site-packages)
    fi

    if [ ! -x "$python" ]; then
        if python3 -c "import ensurepip" >/dev/null 2>&1; then
            python3 -m venv "${site_args[@]}" "$venv" || return 1
        elif command -v uv >/dev/null 2>&1; then
            uv venv --quiet --seed --python "$(command -v python3)" "${site_args[@]}" "$venv" || return 1
        else
            echo "[setup_env] python3 cannot make a venv with pip: install python3-venv (Debian/Ubuntu) or uv" >&2
            return 1
        fi
    fi
    # A .venv made without pip (by an older setup_env.sh) gets it from the interpreter's ensurepip.
    "$python" -m pip --version >/dev/null 2>&1 || "$python" -m ensurepip --upgrade >/dev/null || return 1

    local links="${PIP_FIND_LINKS:-} $("$python" -m pip config get global.find-links 2>/dev/null || true)"
    local -a install=(env PIP_USER=0 "$python" -m pip install --quiet)
    if [ "$system_torch" = 1 ]; then
        echo "[setup_env] keeping the torch that python3 already has: $(python3 -c 'import torch; print(torch.__version__)')"
    else
        if command -v uv >/dev/null 2>&1; then
            install=(uv pip install --quiet --python "$python")
            local link
            for link in $links; do install+=(--find-links "$link"); done
        fi
        # CPU machine: torch 2.13.0's CPU build, Triton 3.6 for the kernels' interpreter (which needs numpy < 2.4).
        if [ -z "${links// /}" ]; then
            "${install[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" || return 1
        fi
        "${install[@]}" "torch==2.13.0" "triton>=3.6,<3.7" "numpy<2.4" || return 1
    fi
    "${install[@]}" -e "$root[dev]" || return 1
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    echo "[setup_env] ready: $(python -c 'import torch, opacus; print("torch", torch.__version__, "| opacus", opacus.__version__)'), $(pip --version | cut -d' ' -f1-2) in .venv"
}
_flashnorm_setup
