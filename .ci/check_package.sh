#!/usr/bin/env bash
# Packaging check (issue #23): build the sdist and the wheel, `twine check` them, install
# the wheel into a fresh venv and use it from outside the source tree.
#
#   bash .ci/check_package.sh            (also `make package-check`; CI runs it)
#
# The build runs on a copy of the working tree (tracked files and untracked ones git does
# not ignore: what a clean clone plus your edits holds), so nothing is written into the
# tree, not even build/ or *.egg-info.  `python -m build` builds the sdist, then the wheel
# from the unpacked sdist, so a file missing from the sdist fails here too.  Everything
# (copy, dist/, venv, kernel cache) lives in one temporary directory removed on exit
# ($TMPDIR, else /dev/shm when it has 4 GB free, else /tmp).
# PYTHON: the interpreter with `build` and `twine` installed (default: .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
# A venv with torch is ~1.5 GB of small files: in memory (/dev/shm) it installs and is
# removed in seconds, on a busy disk removing it alone can take a minute.
BASE=${TMPDIR:-/tmp}
if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ] \
    && [ "$(df -Pk /dev/shm | awk 'NR == 2 {print $4}')" -gt 4000000 ]; then
    BASE=/dev/shm
fi
TMP=$(mktemp -d "$BASE/kdkit-package.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
unset PYTHONPATH
SECONDS=0
step() { printf '[package-check %3ds] %s\n' "$SECONDS" "$*"; }

step "copy the working tree"
mkdir "$TMP/tree"
git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$TMP/tree"

step "build the sdist and the wheel (python -m build)"
"$PYTHON" -m build --outdir "$TMP/dist" "$TMP/tree" >"$TMP/build.log" 2>&1 \
    || { cat "$TMP/build.log"; exit 1; }
VERSION=$("$PYTHON" -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["__version__"])' \
    src/kdkit/_version.py)
WHEEL=$TMP/dist/kdkit-$VERSION-py3-none-any.whl
SDIST=$TMP/dist/kdkit-$VERSION.tar.gz
for f in "$WHEEL" "$SDIST"; do
    [ -f "$f" ] || { echo "package-check: $f was not built (dist/: $(ls "$TMP/dist"))" >&2; exit 1; }
done

step "twine check --strict"
"$PYTHON" -m twine check --strict "$TMP"/dist/*

step "the files the native kernel and typing need are in the wheel and the sdist"
"$PYTHON" - "$WHEEL" "$SDIST" <<'EOF'
import sys, tarfile, zipfile

wheel, sdist = sys.argv[1:]
in_wheel = set(zipfile.ZipFile(wheel).namelist())
in_sdist = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
need = {
    wheel: (in_wheel, ["kdkit/losses/kernels/native.c", "kdkit/py.typed", "kdkit/__init__.py"]),
    sdist: (in_sdist, ["src/kdkit/losses/kernels/native.c", "src/kdkit/py.typed",
                       "pyproject.toml", "README.md"]),
}
missing = [f"{path.rsplit('/', 1)[1]}: {name}"
           for path, (names, wanted) in need.items() for name in wanted if name not in names]
if missing:
    sys.exit("package-check: missing from the distributions: " + ", ".join(missing))
EOF

step "install the wheel into a fresh venv (pins from constraints.txt)"
"$PYTHON" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile \
    -c "$ROOT/constraints.txt" "$WHEEL"

step "kdkit --version and a loss example, from outside the source tree"
mkdir "$TMP/run"
cd "$TMP/run"
got=$("$TMP/venv/bin/kdkit" --version)
[ "$got" = "kdkit $VERSION" ] || { echo "package-check: kdkit --version said '$got', expected 'kdkit $VERSION'" >&2; exit 1; }
echo "$got"
KDKIT_CACHE_DIR=$TMP/kernel-cache "$TMP/venv/bin/python" -I - "$ROOT" <<'EOF'
import pathlib, shutil, sys

root = pathlib.Path(sys.argv[1]).resolve()
import torch
import torch.nn.functional as F

import kdkit
from kdkit.losses.kd import compute_kd_weight, kd_loss
from kdkit.losses.kernels import native

where = pathlib.Path(kdkit.__file__).resolve()
if root in where.parents or "site-packages" not in where.parts:
    sys.exit(f"package-check: kdkit was imported from {where}, not from the installed wheel")

# The specification's kd_loss example, against the plain PyTorch formula.
torch.manual_seed(0)
student_logits = torch.randn(32, 10, requires_grad=True)
teacher_logits = torch.randn(32, 10)
loss = kd_loss(student_logits, teacher_logits, temperature=4.0, loss_type="kldiv")
expected = 16 * F.kl_div(F.log_softmax(student_logits / 4, -1), F.log_softmax(teacher_logits / 4, -1),
                         reduction="batchmean", log_target=True)
torch.testing.assert_close(loss, expected)
loss.backward()
assert kd_loss(student_logits, teacher_logits, reduction="none").shape == (32,)
assert compute_kd_weight(10, warmup_epochs=5, kd_ramp_epochs=10, target_alpha=0.7) == 0.35

# The fused path on the native kernel, compiled from the wheel's native.c.
source = pathlib.Path(native.__file__).with_name("native.c")
assert source.is_file(), f"package-check: {source} is not installed"
s, t = torch.randn(4, 40000, requires_grad=True), torch.randn(4, 40000)
fused = kd_loss(s, t, implementation="fused")
torch.testing.assert_close(fused, kd_loss(s, t, implementation="reference"))
if shutil.which("cc") and not native.available():
    sys.exit(f"package-check: the native kernel did not build from {source}: {native.info()}")
print(f"kd_loss {loss.item():.6f} (spec example), fused {fused.item():.6f}, "
      f"native kernel: {native.available()}, from {where.parent}")
EOF
step "done"
