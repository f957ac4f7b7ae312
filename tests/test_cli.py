from __future__ import annotations

import json
import os
import stat
from typing import Any

from privseg.settings import Settings
from tests.conftest import EVENT_HEADER, PROFILE_HEADER, event_row, profile_row, run_cli, write_csv


def test_keys_init_status_and_refusal_to_overwrite(settings: Settings) -> None:
    out = run_cli(settings, "keys", "init", "--namespace", "acme")
    assert "namespace 'acme'" in out.stdout
    assert stat.S_IMODE(os.stat(settings.keyset).st_mode) == 0o600
    again = run_cli(settings, "keys", "init", check=False)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    status = json.loads(run_cli(settings, "keys", "status", "--json").stdout)
    assert status["namespace"] == "acme" and status["primary"] == 1 and status["store_key_version"] is None
    assert "key" not in json.dumps(status["versions"]).replace("key_version", "")


def test_ingest_status_erase_and_audit_round_trip(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_cli(settings, "keys", "init")
    profiles = write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1"), profile_row("C2")])
    events = write_csv(tmp_path / "e.csv", EVENT_HEADER, [event_row("C1"), event_row("C2"), event_row("C2")])
    out = run_cli(settings, "ingest", "profiles", str(profiles))
    assert "stored profiles batch 1 (2 rows, 2 people, patch)" in out.stdout
    out = run_cli(settings, "ingest", "events", str(events), "--json")
    assert json.loads(out.stdout)[0]["rows"] == 3
    assert "already ingested" in run_cli(settings, "ingest", "events", str(events)).stdout
    status = json.loads(run_cli(settings, "store", "status", "--json").stdout)
    assert status["profiles"]["people"] == 2 and status["events"]["rows"] == 3
    out = run_cli(settings, "erase", "--id", "C2")
    assert "1 profile rows and 2 event rows" in out.stdout
    assert "nothing erased" in run_cli(settings, "erase", "--id", "C2").stdout
    verify = run_cli(settings, "audit", "verify")
    assert "audit log OK: 3 entries" in verify.stdout
    events_logged = [e["event"] for e in json.loads(run_cli(settings, "audit", "show", "--json").stdout)]
    assert events_logged == ["ingest", "ingest", "erasure"]


def test_errors_exit_2_with_a_clear_message_and_no_traceback(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing_keys = run_cli(settings, "ingest", "profiles", str(tmp_path / "x.csv"), check=False)
    assert missing_keys.returncode == 2
    assert "error (keyset-error)" in missing_keys.stderr and "privseg keys init" in missing_keys.stderr
    assert "Traceback" not in missing_keys.stderr
    run_cli(settings, "keys", "init")
    nofile = run_cli(settings, "ingest", "profiles", str(tmp_path / "x.csv"), check=False)
    assert nofile.returncode == 2 and "no such file" in nofile.stderr


def test_audit_verify_exits_1_when_tampered(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    run_cli(settings, "keys", "init")
    run_cli(
        settings,
        "ingest",
        "profiles",
        str(write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1")])),
    )
    conn = sqlite3.connect(settings.db_path)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET details = '{}'")
    conn.commit()
    out = run_cli(settings, "audit", "verify", check=False)
    assert out.returncode == 1 and "TAMPERED" in out.stdout and "first bad entry: 1" in out.stdout


def test_policy_check_and_demo_data(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert "ingest.yaml: OK" in run_cli(settings, "policy", "check").stdout
    broken = tmp_path / "pol"
    broken.mkdir()
    (broken / "ingest.yaml").write_text("version: 1\nidentity: {column: id, type: passport}\n")
    out = run_cli(settings, "policy", "check", str(broken), check=False)
    assert out.returncode == 2 and "identity.type" in out.stderr
    out = run_cli(settings, "demo-data", "--customers", "50", "--seed", "3", "--out", str(tmp_path / "d"))
    assert "wrote 50 customers" in out.stdout
    assert (tmp_path / "d" / "events.csv").stat().st_size > 0


def test_demo_runs_from_nothing_and_is_idempotent(settings: Settings) -> None:
    first = run_cli(settings, "demo", "--customers", "500")
    assert "keys: created" in first.stdout and "stored profiles batch 1 (500 rows" in first.stdout
    assert "chain verified" in first.stdout
    second = run_cli(settings, "demo", "--customers", "500")
    assert (
        "the store already holds data; nothing generated" in second.stdout and "keys: using" in second.stdout
    )
    assert "1 batch(es), 500 rows" in second.stdout  # nothing ingested twice


def test_segments_commands(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_cli(settings, "demo", "--customers", "300")  # applies the examples and computes a snapshot
    listed = run_cli(settings, "segments", "list").stdout
    assert "cart_abandoners_7d" in listed and "rfm_recency" in listed
    shown = json.loads(run_cli(settings, "segments", "show", "cannabis_curious").stdout)
    assert shown["version"] == 1 and shown["category"] == "cannabis"
    explained = run_cli(settings, "segments", "explain", "cart_abandoners_7d").stdout
    assert "add_to_cart events where product_category is none of hearing_aids, cannabis" in explained
    assert "current" in run_cli(settings, "segments", "status").stdout
    edit = tmp_path / "edit.yaml"
    # Coupon redemptions of any product category include stigmatized ones: not "general".
    edit.write_text(
        "id: coupon_responders\ncategory: general\nobjective: brand\nwhere: {event: {type: coupon_redeem}}\n"
    )
    refused = run_cli(settings, "segments", "apply", str(edit), check=False)
    assert refused.returncode == 2  # every PrivsegError exits 2
    assert "where.event (no filter on product_category) reads cannabis data" in refused.stderr
    assert "current" in run_cli(settings, "segments", "status").stdout  # nothing applied
    edit.write_text(
        "id: coupon_responders\ncategory: general\nobjective: brand\n"
        "where: {event: {type: coupon_redeem, where: {product_category: {eq: home}}}}\n"
    )
    assert "updated (v2)" in run_cli(settings, "segments", "apply", str(edit)).stdout
    status = json.loads(run_cli(settings, "segments", "status", "--json").stdout)
    assert status["stale"] and "definitions changed" in status["reasons"][0]
    computed = run_cli(settings, "segments", "compute", "--as-of", "2026-06-01T00:00:00").stdout
    assert "15 segments over 300 people at 2026-06-01T00:00:00+00:00" in computed
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\ncategory: general\nobjective: brand\nwhere: {event: {type: purchse}}\n")
    out = run_cli(settings, "segments", "apply", str(bad), check=False)
    assert out.returncode == 2 and "where.event.type: unknown event type 'purchse'" in out.stderr
    missing = run_cli(settings, "segments", "explain", "nope", check=False)
    assert missing.returncode == 2 and "no active segment 'nope'" in missing.stderr


def test_reidentification_is_cli_only_needs_a_reason_and_is_audited(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from privseg.api.app import create_app
    from privseg.deployment import Deployment
    from privseg.keyset import load_keyset
    from privseg.pseudonym import IdType, Pseudonymizer

    run_cli(settings, "keys", "init")
    run_cli(
        settings,
        "ingest",
        "profiles",
        str(write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C77")])),
    )
    token = Pseudonymizer(load_keyset(settings.keyset), IdType.CUSTOMER_NUMBER).pseudonymize("C77")
    refused = run_cli(settings, "reidentify", "--pseudonym", token, "--reason", "because", check=False)
    assert refused.returncode == 2 and "state the reason" in refused.stderr
    tampered = run_cli(
        settings,
        "reidentify",
        "--pseudonym",
        token[:-2] + "AA",
        "--reason",
        "DSAR-2026-0042 access request",
        check=False,
    )
    assert tampered.returncode == 2 and "does not authenticate" in tampered.stderr
    out = run_cli(settings, "reidentify", "--pseudonym", token, "--reason", "DSAR-2026-0042 access request")
    assert out.stdout.strip() == "C77"
    entries = json.loads(run_cli(settings, "audit", "show", "--json").stdout)
    last = entries[-1]
    assert (
        last["event"] == "reidentification" and last["details"]["reason"] == "DSAR-2026-0042 access request"
    )
    assert "C77" not in json.dumps(entries) and token not in json.dumps(entries)
    # Never over HTTP: no route of the API leads there.
    paths = create_app(Deployment(settings)).openapi()["paths"]
    assert not [p for p in paths if "ident" in p or "decrypt" in p]


def test_the_examples_apply_as_one_set_and_a_lone_segments_file_says_why(settings: Settings) -> None:
    from privseg.keyset import create_keyset

    create_keyset(settings.keyset, "test")
    _traits, segments = run_cli(settings, "segments", "examples").stdout.split()
    alone = run_cli(settings, "segments", "apply", segments, check=False)
    assert alone.returncode == 2
    assert "unknown trait 'rfm_recency'" in alone.stderr and "traits.yaml" in alone.stderr
    applied = run_cli(settings, "segments", "examples", "--apply").stdout
    assert (
        "trait rfm_recency: created (v1)" in applied and "segment cart_abandoners_7d: created (v1)" in applied
    )


def test_every_command_speaks_json(settings: Settings) -> None:
    run_cli(settings, "demo", "--customers", "300")

    def as_json(*args: str) -> Any:
        return json.loads(run_cli(settings, *args, "--json").stdout)

    assert as_json("policy", "check")["ok"] is True
    assert as_json("policy", "diff", str(settings.policy_dir), str(settings.policy_dir)) == {
        "changes": [],
        "looser": [],
    }
    explained = as_json("segments", "explain", "hearing_aid_interest_55plus")
    assert explained["categories"] == ["hearing_aids"] and explained["because"]
    key = as_json("apikey", "create", "--role", "marketer", "--name", "crm_team")
    assert key["token"].startswith("psk_") and key["role"] == "marketer"
    assert as_json("apikey", "revoke", str(key["key_id"])) == {"revoked": key["key_id"]}
    erased = json.loads(run_cli(settings, "erase", "--id", "-", "--json", stdin="C000000001\n").stdout)
    assert erased["found"] is True and "C000000001" not in json.dumps(erased)
    assert as_json("keys", "rotate")["to_version"] == 2
    assert as_json("keys", "retire") == {"retired": [1]}  # store and snapshots moved to version 2
    steps = as_json("demo", "--customers", "300")["steps"]
    assert any("nothing generated" in s for s in steps)


def test_examples_a_deployment_cannot_serve_are_skipped_and_said_so(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from privseg.keyset import create_keyset

    policies = tmp_path / "policies"
    shutil.copytree(settings.policy_dir, policies)
    ingest_yaml = policies / "ingest.yaml"
    import yaml

    doc = yaml.safe_load(ingest_yaml.read_text())
    doc["events"]["attributes"]["event_type"]["values"].remove("add_to_cart")
    # The live-intake mapping may not name a type the policy no longer has either.
    doc["intake"]["events"] = {k: v for k, v in doc["intake"]["events"].items() if v["type"] != "add_to_cart"}
    ingest_yaml.write_text(yaml.safe_dump(doc))
    narrower = settings.model_copy(update={"policy_dir": policies})
    create_keyset(narrower.keyset, "test")
    out = json.loads(run_cli(narrower, "segments", "examples", "--apply", "--json").stdout)
    skipped = "\n".join(out["skipped"])
    assert "segment cart_abandoners_7d:" in skipped and "unknown event type 'add_to_cart'" in skipped
    assert "segment spring_test_treatment: uses a definition skipped" in skipped  # references it
    applied = {r["id"] for r in out["applied"]}
    assert "frequent_buyers" in applied and "cart_abandoners_7d" not in applied


def test_version(settings: Settings) -> None:
    from privseg import __version__

    assert run_cli(settings, "--version").stdout.strip() == f"privseg {__version__}"


def test_policy_check_names_the_stored_definitions_a_policy_change_would_stop(
    settings: Settings, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import shutil

    def check(policy_dir: object = None) -> tuple[int, dict[str, Any], str]:
        args = ["policy", "check", *([] if policy_dir is None else [str(policy_dir)])]
        text = run_cli(settings, *args, check=False)
        as_json = run_cli(settings, *args, "--json", check=False)
        assert text.returncode == as_json.returncode
        return text.returncode, json.loads(as_json.stdout), text.stdout

    code, doc, text = check()  # no deployment yet: nothing to check against, and none is created
    assert code == 0 and doc["definitions_checked"] is False and "not checked" in text
    assert not settings.db_path.exists()

    run_cli(settings, "keys", "init")
    defs = tmp_path / "defs.yaml"
    defs.write_text(
        "segments:\n"
        "  - {id: new_signups, category: general, objective: brand,\n"
        "     where: {property: {signup_date: {gte: 2026-01-01}}}}\n"
        "  - {id: new_women, category: general, objective: brand,\n"
        "     where: {all: [{segment: new_signups}, {property: {gender: {eq: female}}}]}}\n"
        "  - {id: women, category: general, objective: brand, where: {property: {gender: {eq: female}}}}\n"
    )
    run_cli(settings, "segments", "apply", str(defs))
    code, doc, text = check()
    assert code == 0 and doc["ok"] is True and doc["unbuildable_definitions"] == []
    assert "stored definitions: OK, all 3 can be computed" in text

    # Compliance stops collecting signup dates: a valid policy set, which would stop every snapshot.
    changed = tmp_path / "policies"
    shutil.copytree(settings.policy_dir, changed)
    ingest = (changed / "ingest.yaml").read_text()
    assert "    signup_date: {type: date}\n" in ingest
    (changed / "ingest.yaml").write_text(ingest.replace("    signup_date: {type: date}\n", ""))
    code, doc, text = check(changed)
    assert code == 1 and doc["ok"] is False and doc["findings"] == []
    assert [line.split(":")[0] for line in doc["unbuildable_definitions"]] == [
        "segment 'new_signups'",
        "segment 'new_women'",
    ]
    assert doc["unbuildable_definitions"][0].startswith(
        "segment 'new_signups': v1.where.property.signup_date: unknown profile attribute"
    )
    assert doc["unbuildable_definitions"][1].endswith("uses segment 'new_signups', which cannot be built")
    assert "2 of 3 could not be computed" in text and "segment 'women'" not in text
    # The check changes no definition (the same three, none retired, at version 1), and what it
    # predicts is what a snapshot under that set does.
    listed = json.loads(run_cli(settings, "segments", "list", "--json").stdout)
    assert sorted((d["id"], d["version"], d["retired"]) for d in listed) == [
        ("new_signups", 1, False),
        ("new_women", 1, False),
        ("women", 1, False),
    ]
    moved = settings.model_copy(update={"policy_dir": changed})
    out = run_cli(moved, "segments", "compute", check=False)
    assert out.returncode != 0 and "new_signups" in out.stderr + out.stdout
    # Deployed anyway: the status shows why no snapshot comes, where it shows that one is due.
    status = json.loads(run_cli(moved, "segments", "status", "--json").stdout)
    assert status["stale"] is True and len(status["reasons"]) == 2
    assert status["reasons"][1].startswith("no snapshot can be computed under the policies in force")
    assert "segment 'new_signups': v1.where.property.signup_date" in status["reasons"][1]
    before = json.loads(run_cli(settings, "segments", "status", "--json").stdout)
    assert before["reasons"] == ["no snapshot has been computed"]
