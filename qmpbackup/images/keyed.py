"""Encrypted repository images opened through QEMU's own driver, with the key in a file.

A repository made with ``--encrypt-key FILE`` holds LUKS-encrypted qcow2 images. This
process never reads the key: ``qemu-img`` and ``qemu-nbd`` get a ``secret`` object that
reads the file (``--object secret,id=…,file=FILE``) and each layer of the chain names it
(``encrypt.key-secret``, ``backing.encrypt.key-secret``, …), so the key's value is never
on a command line. :func:`using_key` sets the key file for the calls made inside it
(a context variable: threads started with :func:`asyncio.to_thread` see it too).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3

SECRET_ID = "qmpbackup-key"
# BLAKE3's derive_key context: the block digests' key comes from the key file's bytes,
# so that the digests of an encrypted repository say nothing about its data.
DIGEST_CONTEXT = "qmpbackup 2026-12 encrypted repository block digests v1"

# A key file this long is taken for a random key (``openssl rand -base64 32``), which
# LUKS's PBKDF2 cannot make stronger: its images get the shortest stretching, so that each
# open costs milliseconds instead of QEMU's default 2 s. A shorter one may be a passphrase
# a person chose, and keeps QEMU's default.
RANDOM_KEY_BYTES = 32
RANDOM_KEY_ITER_TIME_MS = 10

_KEY: contextvars.ContextVar[Path | None] = contextvars.ContextVar("qmpbackup_key", default=None)
_DIGEST_KEY: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "qmpbackup_digest_key", default=None
)


@contextlib.contextmanager
def using_key(path: Path | str | None) -> Iterator[None]:
    """Open images with the key in ``path``, and key the block digests with a key derived
    from its bytes (None: images are not encrypted) inside. OSError if it cannot be read."""
    key = None if path is None else Path(path).absolute()
    derived = None
    if key is not None:
        derived = blake3.blake3(key.read_bytes(), derive_key_context=DIGEST_CONTEXT).digest()
    token, digest_token = _KEY.set(key), _DIGEST_KEY.set(derived)
    try:
        yield
    finally:
        _KEY.reset(token)
        _DIGEST_KEY.reset(digest_token)


def digest_key() -> bytes | None:
    """The key of the block digests here: derived from the key file, or None."""
    return _DIGEST_KEY.get()


def key_file() -> Path | None:
    """The key file images are opened with here, if any."""
    return _KEY.get()


def _opt(value: str) -> str:
    """``value`` as a QEMU option value: commas doubled."""
    return value.replace(",", ",,")


def iter_time() -> int | None:
    """The PBKDF2 time (ms) of the LUKS headers created here: short for a random key (see
    :data:`RANDOM_KEY_BYTES`), None (QEMU's default) for a shorter key or none."""
    key = _KEY.get()
    if key is None or key.stat().st_size < RANDOM_KEY_BYTES:
        return None
    return RANDOM_KEY_ITER_TIME_MS


def luks_create_options() -> str:
    """The ``-o`` options of ``qemu-img create``/``convert`` making a LUKS-encrypted qcow2
    with the key set here (see :func:`iter_time`)."""
    stretch = "" if (ms := iter_time()) is None else f",encrypt.iter-time={ms}"
    return f"encrypt.format=luks,encrypt.key-secret={SECRET_ID}{stretch}"


def object_args() -> list[str]:
    """``--object secret,…,file=KEY`` when a key is set, else nothing."""
    key = _KEY.get()
    return [] if key is None else ["--object", f"secret,id={SECRET_ID},file={_opt(str(key))}"]


def encrypted_layers(path: Path) -> list[bool]:
    """Whether each image of ``path``'s backing chain (``path`` first) is encrypted; opens
    no data, so it needs no key."""
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return [False]
    found = json.loads(proc.stdout)
    layers = found if isinstance(found, list) else [found]
    return [bool(layer.get("encrypted")) for layer in layers]


def image_args(path: Path | str, fmt: str = "qcow2") -> list[str]:
    """The arguments naming an image for ``qemu-img``/``qemu-nbd``: ``-f FMT PATH``, or
    with a key, for an encrypted qcow2 chain, ``--image-opts`` naming the secret for every
    encrypted layer (a restored image, written in the clear, is named as usual)."""
    if _KEY.get() is None or fmt != "qcow2":
        return ["-f", fmt, str(path)]
    layers = encrypted_layers(Path(path))
    if not any(layers):
        return ["-f", fmt, str(path)]
    parts = [f"driver=qcow2,file.driver=file,file.filename={_opt(str(path))}"]
    for level, encrypted in enumerate(layers):
        if encrypted:
            parts.append("backing." * level + f"encrypt.key-secret={SECRET_ID}")
    return ["--image-opts", ",".join(parts)]
