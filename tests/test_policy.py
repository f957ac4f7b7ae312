from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from privseg.deployment import Deployment
from privseg.errors import PolicyError
from privseg.policy.categories import read_categories
from privseg.policy.checks import findings, load_categories
from privseg.policy.diff import diff
from tests.conftest import POLICIES


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


def _edit(folder: Path, category: str, path: str, value: object) -> None:
    f = folder / "categories" / f"{category}.yaml"
    doc = yaml.safe_load(f.read_text())
    node = doc
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    f.write_text(yaml.safe_dump(doc))


def test_the_shipped_policy_set_is_accepted_and_hashed() -> None:
    cats = load_categories(POLICIES)
    assert set(cats.categories) == {"general", "hearing_aids", "cannabis", "sexual_health"}
    assert all(c.stigmatized for n, c in cats.categories.items() if n != "general")
    assert len(cats.content_hash) == 16 and cats.content_hash == read_categories(POLICIES).content_hash


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("epsilon_per_release", 0.6, "epsilon_per_release is 0.6, looser than general's 0.5"),
        ("budget.per_recipient", 11.0, "budget.per_recipient is 11.0, looser"),
        ("budget.category_cap", 50.0, "budget.category_cap is 50.0, looser"),
        ("budget.period_days", 7, "budget.period_days is 7, looser than general's 30"),
        ("min_cohort_size", 10, "min_cohort_size is 10, looser than general's 50"),
        ("breakdowns.max_dimensions", 3, "max_dimensions is 3, looser"),
        ("recipients.partners", ["adnet_alpha", "shady_net"], "grants partners ['shady_net']"),
        ("consent_attribute", "consent_marketing", "needs its own, explicit consent"),
        ("value_clip", 900.0, "value_clip is 900.0, looser"),
    ],
)
def test_a_stigmatized_category_looser_than_general_is_refused(
    tmp_path: Path, path: str, value: object, message: str
) -> None:
    folder = _copy(tmp_path)
    if path == "budget.per_recipient":
        _edit(folder, "hearing_aids", "budget.category_cap", 12.0)  # keep the category self-consistent
    _edit(folder, "hearing_aids", path, value)
    with pytest.raises(PolicyError) as info:
        load_categories(folder)
    assert "hearing_aids: " in str(info.value) and message in str(info.value)
    assert "refused" in str(info.value)


def test_partner_audiences_and_breakdowns_must_not_exceed_general(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    _edit(folder, "general", "partner_audiences", False)
    _edit(folder, "general", "breakdowns.forbidden", ["income_band"])
    _edit(folder, "general", "breakdowns.allowed", ["age_band", "region", "gender"])
    _edit(folder, "cannabis", "breakdowns.forbidden", ["gender"])
    found = findings(read_categories(folder))
    assert "hearing_aids: allows partner audiences, which general does not" in found
    assert "cannabis: does not forbid ['income_band'], which general forbids" in found


def test_breakdowns_need_a_public_single_valued_domain(dep: Deployment, tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    _edit(folder, "general", "breakdowns.allowed", ["age_band", "interests", "shoe_size"])
    found = findings(read_categories(folder), dep.schema)
    assert (
        "general: breakdown 'interests' has no public single-valued domain "
        "(lists and free text cannot be keys)" in found
    )
    assert "general: breakdown 'shoe_size' is not a profile attribute" in found


def test_bad_files_name_the_file_and_field(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    _edit(folder, "cannabis", "epsilon_per_release", -1)
    with pytest.raises(
        PolicyError, match=r"cannabis\.yaml: epsilon_per_release: Input should be greater than 0"
    ):
        read_categories(folder)
    # A clip past what integer cents can sum safely (see CategoryPolicy.value_clip).
    folder3 = _copy(tmp_path / "c")
    _edit(folder3, "general", "value_clip", 1e12)
    with pytest.raises(
        PolicyError, match=r"general\.yaml: value_clip: Input should be less than or equal to 1000000"
    ):
        read_categories(folder3)
    # YAML's .inf: an infinite budget made every charge in the category fail (OverflowError).
    folder4 = _copy(tmp_path / "d")
    _edit(folder4, "general", "budget.per_recipient", float("inf"))
    with pytest.raises(PolicyError, match=r"general\.yaml: budget\.per_recipient: Input should be a finite"):
        read_categories(folder4)
    folder2 = _copy(tmp_path / "b")
    _edit(folder2, "cannabis", "name", "weed")
    with pytest.raises(PolicyError, match="does not match the file name"):
        read_categories(folder2)


def test_diff_says_what_got_looser_or_stricter(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    _edit(folder, "general", "epsilon_per_release", 0.4)
    _edit(folder, "general", "min_cohort_size", 40)
    _edit(folder, "general", "recipients.partners", ["adnet_alpha"])
    changes = diff(read_categories(POLICIES), read_categories(folder))
    assert "general: epsilon_per_release 0.5 -> 0.4 (stricter)" in changes
    assert "general: min_cohort_size 50 -> 40 (LOOSER)" in changes
    assert "general: recipients.partners drops ['adnet_beta'] (stricter)" in changes
    assert diff(read_categories(POLICIES), read_categories(POLICIES)) == []


def test_the_server_refuses_to_start_on_a_refused_policy_set(tmp_path: Path) -> None:
    from tests.conftest import make_settings, run_cli

    folder = _copy(tmp_path)
    _edit(folder, "cannabis", "min_cohort_size", 5)
    settings = make_settings(tmp_path).model_copy(update={"policy_dir": folder})
    run_cli(settings, "keys", "init")
    out = run_cli(settings, "serve", "--port", "1", check=False)  # never gets as far as binding
    assert out.returncode == 2
    assert (
        "cannabis: min_cohort_size is 5, looser than general's 50" in out.stderr and "refused" in out.stderr
    )


def test_each_new_policy_set_is_audited_once_at_start_up_and_reading_writes_nothing(
    dep: Deployment, tmp_path: Path
) -> None:
    from privseg import audit

    def loads() -> list[audit.AuditEntry]:
        return [e for e in audit.entries(dep.store.conn, limit=1000) if e.event == "policy_load"]

    before = [(e.seq, e.event) for e in audit.entries(dep.store.conn, limit=1000)]
    dep.categories  # noqa: B018  (reading the policies is not an audited event)
    assert [(e.seq, e.event) for e in audit.entries(dep.store.conn, limit=1000)] == before
    dep.record_policies()  # start-up: a set not seen before is recorded
    Deployment(dep.settings).record_policies()  # same set again: no new entry
    assert len(loads()) == 1 and loads()[0].details["policy_hash"] == dep.categories.content_hash
    folder = _copy(tmp_path)
    _edit(folder, "general", "epsilon_per_release", 0.4)
    changed = Deployment(dep.settings.model_copy(update={"policy_dir": folder}))
    changed.record_policies()
    assert len(loads()) == 2 and loads()[1].details["policy_hash"] == changed.categories.content_hash
    changed.close()


def test_a_consent_attribute_that_is_not_a_boolean_is_a_finding(tmp_path: Path) -> None:
    from privseg.policy.ingest import load_ingest_policy
    from privseg.schema import Schema

    folder = tmp_path / "policies"
    shutil.copytree(POLICIES, folder)
    cannabis = folder / "categories" / "cannabis.yaml"
    cannabis.write_text(
        cannabis.read_text().replace("consent_attribute: consent_sensitive", "consent_attribute: gender")
    )
    schema = Schema.from_ingest_policy(load_ingest_policy(folder / "ingest.yaml"))
    found = findings(read_categories(folder), schema)
    assert "cannabis: consent_attribute 'gender' is not a boolean profile attribute" in "\n".join(found)
