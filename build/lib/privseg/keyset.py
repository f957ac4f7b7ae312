"""The keyset: versioned AES-SIV pseudonym keys and the audit MAC key, in one JSON file.

File format (``keys/keyset.json``, mode 0600)::

    {"format": 1, "namespace": "acme-prod", "created_at": "...", "primary": 2,
     "pseudonym_keys": [{"version": 1, "created_at": "...", "key": "<base64, 64 bytes>"}, ...],
     "audit_key": "<base64, 32 bytes>"}

``primary`` is the newest pseudonym key version; the store records which version its pseudonyms
use (a rotation moves it from one to the other, see ``rekey.py``). Key bytes live only inside
:class:`SecretKey`, whose ``repr`` and ``str`` are redacted, and no error built here quotes the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privseg.errors import KeysetError, describe_validation_error
from privseg.fsutil import write_private_bytes

FORMAT_VERSION = 1
PSEUDONYM_KEY_BITS = 512  # AES-SIV with two 256-bit halves (S2V/CMAC and CTR)
AUDIT_KEY_BYTES = 32


class SecretKey:
    """Key bytes that refuse to show themselves in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_material",)

    def __init__(self, material: bytes) -> None:
        self._material = material

    def reveal(self) -> bytes:
        """The raw bytes, for handing to a cipher. Never log or return them."""
        return self._material

    def __repr__(self) -> str:
        return f"SecretKey(<redacted {len(self._material)} bytes>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretKey) and hmac.compare_digest(self._material, other._material)

    def __hash__(self) -> int:
        return hash(("SecretKey", hashlib.sha256(self._material).digest()))

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("SecretKey cannot be pickled")


@dataclass(frozen=True)
class PseudonymKey:
    version: int
    created_at: str
    key: SecretKey = field(repr=False)


@dataclass(frozen=True)
class Keyset:
    namespace: str
    created_at: str
    primary: int
    pseudonym_keys: dict[int, PseudonymKey] = field(repr=False)
    audit_key: SecretKey = field(repr=False)

    def pseudonym_key(self, version: int) -> SecretKey:
        try:
            return self.pseudonym_keys[version].key
        except KeyError:
            raise KeysetError(
                f"the keyset has no pseudonym key version {version} "
                f"(it holds versions {sorted(self.pseudonym_keys)})"
            ) from None

    def derived_key(self, purpose: str) -> bytes:
        """A purpose-bound subkey of the audit key (e.g. for keyed content hashes)."""
        return hmac.new(self.audit_key.reveal(), f"privseg/{purpose}".encode(), hashlib.sha256).digest()

    def fingerprint(self, version: int | None = None) -> str:
        """A MAC of a fixed label under pseudonym key ``version`` (None: the audit key): it tells two
        keys apart and reveals nothing of them. The store records these to refuse a swapped keyset."""
        key = self.audit_key if version is None else self.pseudonym_key(version)
        label = b"privseg/key-fingerprint/" + (b"audit" if version is None else str(version).encode())
        return hmac.new(key.reveal(), label, hashlib.sha256).hexdigest()[:32]

    def describe(self) -> dict[str, object]:
        """Everything about the keyset except key bytes: safe to print."""
        return {
            "namespace": self.namespace,
            "created_at": self.created_at,
            "primary": self.primary,
            "versions": [
                {"version": k.version, "created_at": k.created_at}
                for k in sorted(self.pseudonym_keys.values(), key=lambda k: k.version)
            ],
        }


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    created_at: str
    key: str


class _KeysetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int
    namespace: str = Field(min_length=1, max_length=200)
    created_at: str
    primary: int = Field(ge=1)
    pseudonym_keys: list[_KeyEntry] = Field(min_length=1)
    audit_key: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, where: str, expected_len: int) -> bytes:
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeysetError(f"keyset field {where} is not valid base64") from None
    if len(data) != expected_len:
        raise KeysetError(f"keyset field {where} must hold {expected_len} bytes, found {len(data)}")
    return data


def _serialize(ks: Keyset) -> bytes:
    doc = {
        "format": FORMAT_VERSION,
        "namespace": ks.namespace,
        "created_at": ks.created_at,
        "primary": ks.primary,
        "pseudonym_keys": [
            {"version": k.version, "created_at": k.created_at, "key": _b64(k.key.reveal())}
            for k in sorted(ks.pseudonym_keys.values(), key=lambda k: k.version)
        ],
        "audit_key": _b64(ks.audit_key.reveal()),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def _check_file_safety(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KeysetError(
            f"no keyset at {path}: create one with `privseg keys init` (or set PRIVSEG_KEYSET)"
        ) from None
    if stat.S_ISLNK(st.st_mode):
        raise KeysetError(f"keyset {path} is a symbolic link; refusing to follow it (use the real path)")
    if not stat.S_ISREG(st.st_mode):
        raise KeysetError(f"keyset {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeysetError(
            f"keyset {path} is readable or writable by group/other (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}`"
        )


def load_keyset(path: Path) -> Keyset:
    """Load and check a keyset file. Errors name the problem but never quote the file's content."""
    _check_file_safety(path)
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KeysetError(f"keyset {path} is not valid JSON") from None
    try:
        parsed = _KeysetFile.model_validate(doc)
    except ValidationError as exc:
        # include_input=False: pydantic would otherwise echo the offending value, i.e. key bytes.
        problems = describe_validation_error(exc)
        raise KeysetError(f"keyset {path} is malformed: {problems}") from None
    if parsed.format != FORMAT_VERSION:
        raise KeysetError(f"keyset {path} has format {parsed.format}; this privseg reads {FORMAT_VERSION}")
    keys: dict[int, PseudonymKey] = {}
    for i, entry in enumerate(parsed.pseudonym_keys):
        if entry.version in keys:
            raise KeysetError(f"keyset {path} lists pseudonym key version {entry.version} twice")
        material = _unb64(entry.key, f"pseudonym_keys[{i}].key", PSEUDONYM_KEY_BITS // 8)
        keys[entry.version] = PseudonymKey(entry.version, entry.created_at, SecretKey(material))
    if parsed.primary not in keys:
        raise KeysetError(f"keyset {path} names primary version {parsed.primary}, which it does not hold")
    if parsed.primary != max(keys):
        raise KeysetError(f"keyset {path}: the primary version must be the newest ({max(keys)})")
    audit = _unb64(parsed.audit_key, "audit_key", AUDIT_KEY_BYTES)
    return Keyset(parsed.namespace, parsed.created_at, parsed.primary, keys, SecretKey(audit))


def create_keyset(path: Path, namespace: str) -> Keyset:
    """Create a new keyset file (mode 0600). Refuses to overwrite an existing one."""
    if os.path.lexists(path):
        raise KeysetError(f"a keyset already exists at {path}; refusing to overwrite it")
    if not namespace.strip():
        raise KeysetError("the keyset namespace must not be empty")
    now = _now()
    ks = Keyset(
        namespace=namespace.strip(),
        created_at=now,
        primary=1,
        pseudonym_keys={1: PseudonymKey(1, now, SecretKey(AESSIV.generate_key(PSEUDONYM_KEY_BITS)))},
        audit_key=SecretKey(os.urandom(AUDIT_KEY_BYTES)),
    )
    write_private_bytes(path, _serialize(ks))
    return ks


def add_pseudonym_version(path: Path) -> Keyset:
    """Add a new pseudonym key version and make it primary (atomic rewrite of the file)."""
    ks = load_keyset(path)
    version = ks.primary + 1
    keys = dict(ks.pseudonym_keys)
    keys[version] = PseudonymKey(version, _now(), SecretKey(AESSIV.generate_key(PSEUDONYM_KEY_BITS)))
    new = Keyset(ks.namespace, ks.created_at, version, keys, ks.audit_key)
    write_private_bytes(path, _serialize(new))
    return new


def remove_pseudonym_versions(path: Path, versions: set[int]) -> Keyset:
    """Delete pseudonym key versions from the keyset file (never the primary); atomic rewrite."""
    ks = load_keyset(path)
    if ks.primary in versions:
        raise KeysetError(f"key version {ks.primary} is the primary version and cannot be retired")
    keys = {v: k for v, k in ks.pseudonym_keys.items() if v not in versions}
    new = Keyset(ks.namespace, ks.created_at, ks.primary, keys, ks.audit_key)
    write_private_bytes(path, _serialize(new))
    return new
