"""What a config may not do: call interpolation resolvers outside an allow-list, or hold a secret.

* **Resolvers.** OmegaConf registers ``oc.env`` (reads any environment variable — a secret leaks
  into the saved ``config.yaml``, the checkpoint and W&B), ``oc.decode`` (parses strings into
  nodes), ``oc.create`` and others by default, and any imported library may register more. A
  config may use plain ``${a.b}`` interpolations and the resolvers in :data:`ALLOWED_RESOLVERS`
  only; anything else is a :class:`~mmdiff.errors.ConfigError` naming the resolver and the key.
* **Secrets.** No config value may contain the value of a secret-looking environment variable
  (a name with KEY, TOKEN, SECRET, PASSWORD, PASSWD or CREDENTIAL in it, value of 8 characters or
  more, e.g. ``WANDB_API_KEY``). mmdiff's schema has no secret field — W&B, Hugging Face and cloud
  clients read their credentials from the environment — so such a value is refused rather than
  saved. The error names the key and the variable, never the value.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from mmdiff.config.resolvers import RESOLVERS
from mmdiff.errors import ConfigError

#: Interpolation resolvers a config may call: ``oc.select`` only reads other config keys, and
#: mmdiff's own (:mod:`mmdiff.config.resolvers`) read nothing a config must not hold.
ALLOWED_RESOLVERS: Tuple[str, ...] = ("oc.select", *RESOLVERS)

# `${NAME:` opens a resolver call in OmegaConf's grammar (a plain `${a.b}` has no colon).
_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w\-]*(?:\.[A-Za-z_][\w\-]*)*)\s*:")
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL")
_MIN_SECRET_LENGTH = 8


def _strings(node: Any, prefix: str = "") -> Iterator[Tuple[str, str]]:
    """(dotted key, string value) of every string leaf of a plain container."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _strings(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _strings(value, f"{prefix}[{i}]")
    elif isinstance(node, str):
        yield prefix, node


def _plain(cfg: Any, resolve: bool) -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=resolve, enum_to_str=True)
    return cfg


def check_resolvers(cfg: Any, source: str = "the config") -> None:
    """Raise :class:`ConfigError` if an unresolved config calls a resolver not allowed."""
    for key, value in _strings(_plain(cfg, resolve=False)):
        for name in _RESOLVER_CALL.findall(value):
            if name not in ALLOWED_RESOLVERS:
                allowed = ", ".join(ALLOWED_RESOLVERS)
                raise ConfigError(
                    f"'{key}' in {source} calls the interpolation resolver '{name}', which configs may "
                    f"not use (allowed: plain ${{key}} references and {allowed}); write the value itself."
                )


def secret_env_values(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """``{value: variable name}`` of the secret-looking environment variables."""
    env = os.environ if env is None else env
    return {value: name for name, value in env.items()
            if _SECRET_NAME.search(name.upper()) and len(value) >= _MIN_SECRET_LENGTH}


def check_no_secrets(cfg: Any, env: Optional[Mapping[str, str]] = None) -> None:
    """Raise :class:`ConfigError` if a config value (resolved) contains a secret's value."""
    secrets = secret_env_values(env)
    if not secrets:
        return
    for key, value in _strings(_plain(cfg, resolve=True)):
        for secret, name in secrets.items():
            if secret in value:
                raise ConfigError(
                    f"'{key}' holds the value of the environment variable {name}; secrets must not be "
                    "in configs (they are saved with the run) — leave credentials in the environment."
                )


__all__ = ["ALLOWED_RESOLVERS", "check_resolvers", "check_no_secrets", "secret_env_values"]
