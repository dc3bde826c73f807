# Sourced by the scripts: sets BIN, the folder of the release binaries: $DIALORA_BIN when set,
# else the release folder of cargo's target directory: $CARGO_TARGET_DIR when set (a relative
# one from the repository root, where make runs cargo), else the repository's target/.
_dialora_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${DIALORA_BIN:-}" ]; then
  BIN=$DIALORA_BIN
else
  _dialora_target=${CARGO_TARGET_DIR:-target}
  case $_dialora_target in /*) ;; *) _dialora_target=$_dialora_root/$_dialora_target ;; esac
  BIN=$_dialora_target/release
fi
unset _dialora_root _dialora_target
