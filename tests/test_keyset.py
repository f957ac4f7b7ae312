from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import stat
from pathlib import Path

import pytest

from privseg.errors import KeysetError
from privseg.keyset import add_pseudonym_version, create_keyset, load_keyset


def _key_strings(path: Path) -> list[str]:
    doc = json.loads(path.read_text())
    return [k["key"] for k in doc["pseudonym_keys"]] + [doc["audit_key"]]


def test_created_with_mode_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "keyset.json"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        ks = create_keyset(path, "acme")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = load_keyset(path)
    assert loaded.namespace == "acme" and loaded.primary == 1
    assert loaded.pseudonym_key(1) == ks.pseudonym_key(1)
    assert len(loaded.pseudonym_key(1).reveal()) == 64  # 512-bit AES-SIV
    assert len(loaded.audit_key.reveal()) == 32


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    create_keyset(path, "a")
    before = path.read_bytes()
    with pytest.raises(KeysetError, match="already exists"):
        create_keyset(path, "b")
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keyset.json"
    create_keyset(path, "a")
    os.chmod(path, mode)
    with pytest.raises(KeysetError, match="chmod 600"):
        load_keyset(path)


def test_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    create_keyset(real, "a")
    link = tmp_path / "keyset.json"
    link.symlink_to(real)
    with pytest.raises(KeysetError, match="symbolic link"):
        load_keyset(link)


def test_missing_keyset_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(KeysetError, match="privseg keys init"):
        load_keyset(tmp_path / "nope.json")


def _write_0600(path: Path, data: str) -> None:
    path.write_text(data)
    os.chmod(path, 0o600)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: json.dumps({**d, "format": 99}), "format 99"),
        (lambda d: json.dumps({k: v for k, v in d.items() if k != "audit_key"}), "audit_key"),
        (lambda d: json.dumps({**d, "extra": 1}), "extra"),
        (lambda d: json.dumps({**d, "primary": 7}), "primary version 7"),
        (lambda d: json.dumps({**d, "audit_key": "!!notbase64!!"}), "not valid base64"),
        (lambda d: json.dumps({**d, "audit_key": base64.b64encode(b"short").decode()}), "must hold 32 bytes"),
        (lambda d: json.dumps({**d, "pseudonym_keys": d["pseudonym_keys"] * 2}), "twice"),
        (lambda d: json.dumps({**d, "pseudonym_keys": [{**d["pseudonym_keys"][0], "key": 5}]}), "key"),
    ],
)
def test_malformed_keyset_errors_name_the_problem_without_key_bytes(
    tmp_path: Path, mutate: object, message: str
) -> None:
    path = tmp_path / "keyset.json"
    create_keyset(path, "a")
    secrets = _key_strings(path)
    doc = json.loads(path.read_text())
    assert callable(mutate)
    _write_0600(path, mutate(doc))
    with pytest.raises(KeysetError, match=message) as info:
        load_keyset(path)
    text = str(info.value) + repr(info.value)
    for secret in secrets:
        assert secret not in text
        assert secret[:16] not in text


def test_key_bytes_never_show_in_repr_str_logs_or_pickles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keyset.json"
    ks = create_keyset(path, "a")
    secrets = _key_strings(path)
    raw = [ks.pseudonym_key(1).reveal(), ks.audit_key.reveal()]
    caplog.set_level(logging.DEBUG)
    logging.getLogger("test").info("keyset %s %r %s", ks, ks.audit_key, ks.pseudonym_keys)
    shown = (
        repr(ks)
        + str(ks)
        + repr(ks.pseudonym_keys)
        + str(ks.audit_key)
        + caplog.text
        + json.dumps(ks.describe())
    )
    for secret in secrets:
        assert secret not in shown
    for material in raw:
        assert material.hex() not in shown and repr(material) not in shown
    assert "redacted" in repr(ks.audit_key)
    with pytest.raises(TypeError):
        pickle.dumps(ks.audit_key)


def test_add_version_keeps_old_keys_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    ks1 = create_keyset(path, "a")
    ks2 = add_pseudonym_version(path)
    assert ks2.primary == 2 and sorted(ks2.pseudonym_keys) == [1, 2]
    assert ks2.pseudonym_key(1) == ks1.pseudonym_key(1)
    assert ks2.pseudonym_key(2) != ks1.pseudonym_key(1)
    assert ks2.audit_key == ks1.audit_key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_keyset(path).primary == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keyset.json"]  # no temporaries left


def test_a_servers_requests_share_one_keyset_load_and_see_changes_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request deployments share the server's loaded keyset; a rotation by the CLI (the file
    rewritten) reaches the next request, and a file loosened or swapped for a link after start is
    refused, as at start."""
    import privseg.keyset
    from privseg.deployment import Deployment
    from tests.conftest import make_settings

    settings = make_settings(tmp_path)
    create_keyset(settings.keyset, "test")
    server = Deployment(settings)
    loads: list[Path] = []
    real = privseg.keyset.load_keyset
    monkeypatch.setattr(privseg.keyset, "load_keyset", lambda p: loads.append(p) or real(p))

    def request_keyset() -> privseg.keyset.Keyset:
        fork = server.for_request()
        try:
            return fork.keyset
        finally:
            fork.close()

    first = [request_keyset() for _ in range(5)]
    assert len(loads) == 1 and all(k is first[0] for k in first) and first[0].primary == 1
    server.keyset  # noqa: B018 -- the server's own copy, loaded once and never handed to requests
    add_pseudonym_version(settings.keyset)
    loads.clear()
    assert [request_keyset().primary for _ in range(3)] == [2, 2, 2] and len(loads) == 1
    os.chmod(settings.keyset, 0o640)
    with pytest.raises(KeysetError, match="group/other"):
        request_keyset()
    os.chmod(settings.keyset, 0o600)
    assert request_keyset().primary == 2
    moved = settings.keyset.with_name("real.json")
    settings.keyset.rename(moved)
    settings.keyset.symlink_to(moved)
    with pytest.raises(KeysetError, match="symbolic link"):
        request_keyset()
    server.close()
