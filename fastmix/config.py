"""Config helpers shared by run.py, the tests and the benches."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def register_resolvers() -> None:
    """`${repo:data/embedded}` -> an absolute path inside the checkout, whatever
    the working directory (Hydra changes it per job); `${join:${oc.dict.keys:oracle.suite}}`
    -> "a,b,c", a sweep's choices (experiment=oracle sweeps every objective of the suite)."""
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda p="": str(REPO / p))
    if not OmegaConf.has_resolver("join"):
        OmegaConf.register_new_resolver("join", lambda items: ",".join(map(str, items)))
    if not OmegaConf.has_resolver("suite_names"):  # ${suite_names:${oracle.suite},tuning|held_out}: a role's objectives
        OmegaConf.register_new_resolver("suite_names", lambda suite, roles: ",".join(
            n for n, e in suite.items() if e.get("role") in str(roles).split("|")))
    if not OmegaConf.has_resolver("basename"):  # ${basename:${oracle.landscape}} -> "k3": a sweep folder's name
        OmegaConf.register_new_resolver("basename", lambda p: Path(str(p)).name)


def abspath(p) -> Path:
    """A user path made absolute against the directory the command was run from
    (not the job folder Hydra switched to)."""
    from hydra.utils import to_absolute_path
    return Path(to_absolute_path(str(Path(str(p)).expanduser())))
