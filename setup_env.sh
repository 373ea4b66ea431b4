# FlashNorm development environment. Use:  source setup_env.sh
#
# Creates .venv with uv and installs flashnorm in editable mode with its dev extra (tests, Hugging Face,
# tutorials, docs: what .ci/run needs).
# * A machine whose python3 already imports torch (a GPU user's CUDA build) keeps it and its Triton:
#   the venv sees the system site-packages and pip installs only what is missing.
# * Otherwise the CPU build torch==2.13.0 is installed with Triton 3.6 (the kernels' interpreter),
#   taken from pip's configured find-links when there are some (uv ignores pip's configuration, so
#   we hand them over), else from PyTorch's CPU index.
_flashnorm_setup() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)" || return 1
    command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv || return 1
    export PATH="$HOME/.local/bin:$PATH"
    local uv_cmd="uv"
    command -v uv >/dev/null 2>&1 || uv_cmd="python3 -m uv"

    local find_links
    find_links="$(python3 -m pip config get global.find-links 2>/dev/null || true)"
    local -a links_args=()
    local link
    for link in $find_links; do links_args+=(--find-links "$link"); done

    if python3 -c "import torch" >/dev/null 2>&1; then
        # A machine with its own torch (a GPU user's CUDA build, and the Triton it ships): the venv sees
        # the system site-packages, and pip (which, unlike uv, counts them as installed) adds the rest.
        echo "[setup_env] keeping the torch that python3 already has: $(python3 -c 'import torch; print(torch.__version__)')"
        [ -x "$root/.venv/bin/python" ] || \
            $uv_cmd venv --quiet --seed --python "$(command -v python3)" --system-site-packages "$root/.venv" || return 1
        "$root/.venv/bin/python" -m pip install --quiet -e "$root[dev]" || return 1
    else
        # CPU machine: torch 2.13.0's CPU build, Triton 3.6 for the kernels' interpreter (which needs numpy < 2.4).
        [ -x "$root/.venv/bin/python" ] || $uv_cmd venv --quiet --python "$(command -v python3)" "$root/.venv" || return 1
        local -a index_args=("${links_args[@]}")
        [ ${#links_args[@]} -gt 0 ] || \
            index_args=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple --index-strategy unsafe-best-match)
        $uv_cmd pip install --quiet --python "$root/.venv/bin/python" "${index_args[@]}" \
            "torch==2.13.0" "triton>=3.6,<3.7" "numpy<2.4" || return 1
        $uv_cmd pip install --quiet --python "$root/.venv/bin/python" "${links_args[@]}" -e "$root[dev]" || return 1
    fi
    # shellcheck disable=SC1091
    source "$root/.venv/bin/activate"
    echo "[setup_env] ready: $(python -c 'import torch, opacus; print("torch", torch.__version__, "| opacus", opacus.__version__)')"
}
_flashnorm_setup
