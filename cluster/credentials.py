"""The local cluster's own secrets: made at random for a cluster's state directory the first time
`aiayn cluster up` needs them, kept in files of mode 0600 inside a directory of mode 0700 there,
and read back by aiayn's own commands. They are never printed, logged or written into the state
file; `aiayn cluster status --json` says where they are, not what they are.

The same login serves every later `up` of that state directory: MLflow keeps its users in its own
database there, so records written under one `up` stay readable after the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.errors import InputError

MLFLOW_LOGIN = "mlflow-login.json"
STORE_LOGIN = "object-store-login.json"


@dataclass(frozen=True)
class MlflowLogin:
    """The MLflow server's administrator, whom aiayn's commands and the cluster's jobs log in as."""

    username: str
    password: str
    server_secret: str  # Flask's key for the auth app's CSRF tokens (MLFLOW_FLASK_SERVER_SECRET_KEY)

    def client_environment(self) -> dict[str, str]:
        """What MLflow's clients read to log in (HTTP basic authentication)."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


def private_dir(path: Path) -> Path:
    """`path`, made mode 0700 if missing, or made 0700 if it is this account's (an older release
    made it with the umask); one that another account owns (or a link) is refused."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise InputError(f"{path}: aiayn's state and secrets must lie in a directory of this account's (found owner "
                         f"{info.st_uid}, mode {oct(stat.S_IMODE(info.st_mode))}); fix or remove it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def check_own_tree(path: Path) -> None:
    """Raise InputError unless `path` and everything below it is this account's and writable by it
    alone: what aiayn unpickles from there can then only be its own."""
    for entry in [path, *path.rglob("*")]:
        info = entry.lstat()
        if info.st_uid != os.getuid() or stat.S_ISLNK(info.st_mode) or stat.S_IMODE(info.st_mode) & 0o022:
            raise InputError(f"{entry}: not this account's alone (owner {info.st_uid}, mode "
                             f"{oct(stat.S_IMODE(info.st_mode))}); aiayn loads nothing from there: remove {path}")


def write_private(path: Path, text: str, replace: bool = True) -> None:
    """Write a file of mode 0600 atomically (created 0600, never readable by others meanwhile).
    `replace=False`: an existing file stays (FileExistsError), so that a secret made twice at once
    never changes under whoever read the first."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def mlflow_login_path(directory: Path) -> Path:
    return directory / MLFLOW_LOGIN


def mlflow_login(directory: Path) -> MlflowLogin:
    """The login kept in `directory` (a private directory), made at random the first time."""
    path = mlflow_login_path(private_dir(directory))
    _make_once(path, lambda: MlflowLogin(username="aiayn", password=secrets.token_urlsafe(24),
                                         server_secret=secrets.token_urlsafe(32)))
    return read_mlflow_login(path)


def read_mlflow_login(path: Path) -> MlflowLogin:
    return _read_login(path, MlflowLogin)


@dataclass(frozen=True)
class StoreLogin:
    """The S3 key of the isolated cluster's object store, which admits no other."""

    access_key: str
    secret_key: str

    def client_environment(self) -> dict[str, str]:
        """What S3 clients (PyArrow, boto3, MLflow) read: the standard AWS variables."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


def store_login_path(directory: Path) -> Path:
    return directory / STORE_LOGIN


def store_login(directory: Path, access_key: str) -> StoreLogin:
    """The store's key kept in `directory` (a private directory), made at random the first time."""
    path = store_login_path(private_dir(directory))
    _make_once(path, lambda: StoreLogin(access_key=access_key, secret_key=secrets.token_urlsafe(32)))
    return read_store_login(path)


def read_store_login(path: Path) -> StoreLogin:
    return _read_login(path, StoreLogin)


def _make_once(path: Path, make) -> None:
    """Write `make()` as JSON (0600) unless `path` exists; of two first uses at once, the first's stays."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            write_private(path, json.dumps(asdict(make())), replace=False)


def _read_login(path: Path, kind: type):
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise InputError(f"{path}: readable by other accounts; `chmod 600 {path}`, or remove it and run "
                         "`aiayn cluster up` again")
    try:
        return kind(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise InputError(f"{path}: not a login aiayn wrote ({type(error).__name__}); remove it and run "
                         "`aiayn cluster up` again") from None


SIGNING_KEY_ENV = "AIAYN_SIGNING_KEY"
SIGNING_KEY_FILE = "signing.key"


def aiayn_home() -> Path:
    """This account's aiayn state (`~/.aiayn`, or $AIAYN_HOME)."""
    return Path(os.environ.get("AIAYN_HOME", Path.home() / ".aiayn"))


def signing_key() -> bytes:
    """The key that signs this account's checkpoints and exports: $AIAYN_SIGNING_KEY where the user
    gives one (the same key on every machine that writes or reads the run's storage), else the one
    kept in ~/.aiayn/credentials/signing.key, made at random the first time. It never enters the
    run's storage: whoever can write there but lacks the key cannot make a checkpoint aiayn loads."""
    given = os.environ.get(SIGNING_KEY_ENV, "")
    if given:
        if len(given) < 32:
            raise InputError(f"{SIGNING_KEY_ENV}: a signing key needs at least 32 characters (it is an HMAC key; "
                             "`python -c 'import secrets; print(secrets.token_hex(32))'` makes one)")
        return given.encode()
    path = private_dir(aiayn_home() / "credentials") / SIGNING_KEY_FILE
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # two first uses at once: the first one's key stays
            write_private(path, secrets.token_hex(32), replace=False)
    if stat.S_IMODE(path.stat().st_mode) & 0o077 or path.stat().st_uid != os.getuid():
        raise InputError(f"{path}: the signing key must be this account's with mode 0600; `chmod 600 {path}`")
    return path.read_text().strip().encode()
