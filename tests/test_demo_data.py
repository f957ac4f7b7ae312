from __future__ import annotations

from pathlib import Path

import polars as pl

from privseg.demo_data import DemoFiles, generate
from tests.conftest import AS_OF


def test_same_seed_same_people(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", customers=300, seed=5, as_of=AS_OF, chunk=128)
    b = generate(tmp_path / "b", customers=300, seed=5, as_of=AS_OF, chunk=128)
    assert a.customers.read_bytes() == b.customers.read_bytes()
    assert a.events.read_bytes() == b.events.read_bytes()
    c = generate(tmp_path / "c", customers=300, seed=6, as_of=AS_OF, chunk=128)
    assert c.events.read_bytes() != a.events.read_bytes()


def test_behaviour_makes_real_segments(demo_files: DemoFiles) -> None:
    customers = pl.read_csv(demo_files.customers, infer_schema=False)
    events = pl.read_csv(demo_files.events, infer_schema=False).with_columns(
        pl.col("ts").str.to_datetime(time_zone="UTC"), pl.col("value").cast(pl.Float64)
    )
    assert customers.get_column("customer_id").n_unique() == 2000
    assert set(events.get_column("customer_id")) <= set(customers.get_column("customer_id"))
    per_person = events.group_by("customer_id").agg(
        n=pl.len(),
        buys=(pl.col("event_type") == "purchase").sum(),
        carts_7d=(
            (pl.col("event_type") == "add_to_cart") & (pl.col("ts") > AS_OF - pl.duration(days=7))
        ).sum(),
        spend=pl.col("value").filter(pl.col("event_type") == "purchase").sum(),
        coupons=(pl.col("event_type") == "coupon_redeem").sum(),
        last=pl.col("ts").max(),
        hearing=(pl.col("product_category") == "hearing_aids").sum(),
        cannabis=(pl.col("product_category") == "cannabis").sum(),
    )
    share = lambda expr: per_person.select(expr.mean()).item()  # noqa: E731
    assert 8 <= events.height / 2000 <= 13  # about ten events per customer
    # Cart abandoners are 12% of customers by design; a few browsers add to a cart too.
    assert 0.08 < share((pl.col("carts_7d") > 0) & (pl.col("buys") == 0)) < 0.2
    assert 0.1 < share(pl.col("buys") >= 3) < 0.4  # frequent buyers
    assert 0.05 < share(pl.col("coupons") > 0) < 0.3  # coupon responders
    assert 0.1 < share(pl.col("last") < AS_OF - pl.duration(days=180)) < 0.25  # lapsed
    assert 0.02 < share(pl.col("hearing") > 0) < 0.1 and 0.02 < share(pl.col("cannabis") > 0) < 0.12
    assert per_person.select(pl.col("spend").max()).item() > 500  # high spenders exist
    # Hearing-aid interest concentrates in people 55+.
    born = customers.select("customer_id", pl.col("birth_date").str.to_date())
    joined = per_person.join(born, on="customer_id").with_columns(
        old=pl.col("birth_date") < pl.date(1971, 6, 1)
    )
    rates = (
        joined.group_by("old").agg((pl.col("hearing") > 0).mean()).sort("old").get_column("hearing").to_list()
    )
    assert rates[1] > 2 * rates[0]
    # Identifiers are messy on purpose (normalization has work to do).
    emails = customers.get_column("email")
    assert emails.str.contains("[A-Z]").any() and emails.str.starts_with(" ").any()
