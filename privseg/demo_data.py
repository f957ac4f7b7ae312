"""Synthetic customers and events with raw identifiers, for demos, tests and benchmarks.

Behaviour is drawn per persona so that real segments exist in the data: browsers, cart abandoners,
discount and coupon seekers, frequent buyers, high spenders, lapsed customers, casual shoppers and
people engaged with content and e-mail who have not bought yet,
plus interest in stigmatized categories (hearing aids, mostly 55+; cannabis, mostly under 45; sexual
health) at plausible rates. Generation is vectorized and streamed to disk in chunks of customers, so
1M customers / 10M events take minutes and bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

EVENT_TYPES = (
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "checkout",
    "purchase",
    "coupon_redeem",
    "email_open",
    "email_click",
)
_PRODUCT_EVENTS = np.array([False, True, False, True, True, True, False, False, False])
_EMAIL_EVENTS = np.array([False, False, False, False, False, False, False, True, True])
CATEGORIES = ("electronics", "home", "beauty", "fashion", "fitness", "travel", "outdoors", "grocery")
STIGMATIZED = ("hearing_aids", "cannabis", "sexual_health")
ALL_CATEGORIES = CATEGORIES + STIGMATIZED
CAMPAIGNS = ("spring_sale", "clearance", "newsletter_w12", "retarget_cart", "brand_story", "loyalty")
INTERESTS = (
    "fitness",
    "travel",
    "beauty",
    "electronics",
    "home",
    "fashion",
    "outdoors",
    "cooking",
    "wellness",
)
GENDERS = ("female", "male", "non_binary", "undisclosed")
INCOME = ("lt_25k", "25k_50k", "50k_100k", "100k_150k", "gt_150k")
FIRST = ("ana", "ben", "chloe", "dev", "emma", "farid", "grace", "hugo", "ines", "jon", "kim", "liam", "mia")
LAST = ("smith", "garcia", "nguyen", "kowalski", "okafor", "rossi", "tanaka", "muller", "silva", "cohen")
DOMAINS = ("example.com", "mail.example.org", "inbox.example.net")

# persona -> (share of customers, mean events, days-ago range, event-type weights in EVENT_TYPES order)
PERSONAS: dict[str, tuple[float, float, tuple[int, int], tuple[float, ...]]] = {
    "browser": (0.21, 14, (0, 365), (40, 40, 15, 3, 0, 0, 0, 1, 1)),
    # Engaged with content and e-mail lately, not buying yet: the brand-objective audience.
    "engaged": (0.06, 12, (0, 45), (40, 25, 10, 0, 0, 0, 0, 15, 10)),
    "cart_abandoner": (0.12, 10, (0, 30), (25, 35, 10, 25, 5, 0, 0, 0, 0)),
    "discount_seeker": (0.10, 12, (0, 365), (20, 25, 10, 10, 5, 12, 12, 3, 3)),
    "frequent_buyer": (0.10, 20, (0, 365), (15, 25, 5, 15, 10, 25, 2, 2, 1)),
    "high_spender": (0.05, 8, (0, 365), (15, 25, 5, 15, 15, 25, 0, 0, 0)),
    "lapsed": (0.15, 6, (181, 700), (30, 30, 10, 10, 5, 15, 0, 0, 0)),
    "casual": (0.21, 5, (0, 365), (35, 30, 10, 8, 4, 8, 1, 2, 2)),
}
_P_SHARE = np.array([p[0] for p in PERSONAS.values()])
_P_MEAN = np.array([p[1] for p in PERSONAS.values()])
_P_LO = np.array([p[2][0] for p in PERSONAS.values()], dtype=np.float64)
_P_HI = np.array([p[2][1] for p in PERSONAS.values()], dtype=np.float64)
_P_CUM = np.cumsum(np.array([p[3] for p in PERSONAS.values()], dtype=np.float64), axis=1)
_P_CUM /= _P_CUM[:, -1:]
_ABANDONER = list(PERSONAS).index("cart_abandoner")
_DISCOUNT = list(PERSONAS).index("discount_seeker")
_HIGH = list(PERSONAS).index("high_spender")


@dataclass(frozen=True)
class DemoFiles:
    customers: Path
    events: Path
    customer_rows: int
    event_rows: int


def _labels(labels: tuple[str, ...], idx: np.ndarray) -> pl.Series:
    return pl.Series(labels, dtype=pl.String).gather(pl.Series(idx, dtype=pl.UInt32))


def _customers(
    rng: np.random.Generator, start: int, n: int, as_of: datetime
) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """One chunk of customers; also their persona index and stigmatized-interest matrix (n x 3)."""
    today = np.datetime64(as_of.date(), "D")
    age = np.clip(rng.normal(47, 17, n), 18, 90).astype(np.int64)
    birth = today - (age * 365.25 + rng.integers(0, 365, n)).astype("timedelta64[D]")
    persona = rng.choice(len(PERSONAS), n, p=_P_SHARE)
    stigma = np.column_stack(
        [
            rng.random(n) < np.where(age >= 55, 0.09, 0.01),  # hearing aids
            rng.random(n) < np.where(age < 45, 0.08, 0.03),  # cannabis
            rng.random(n) < 0.04,  # sexual health
        ]
    )
    # Half of the people with a stigmatized interest also declare it in their profile.
    declared = np.column_stack([rng.random((n, len(INTERESTS))) < 0.2, stigma & (rng.random((n, 3)) < 0.5)])
    names = INTERESTS + STIGMATIZED
    interest_cols = [
        pl.when(pl.lit(pl.Series(declared[:, j]))).then(pl.lit(name)).otherwise(None)
        for j, name in enumerate(names)
    ]
    first = rng.integers(0, len(FIRST), n)
    last = rng.integers(0, len(LAST), n)
    ids = pl.Series(np.arange(start, start + n)).cast(pl.String)
    frame = pl.DataFrame(
        {
            "id": ids,
            "first": _labels(FIRST, first),
            "last": _labels(LAST, last),
            "domain": _labels(DOMAINS, rng.integers(0, len(DOMAINS), n)),
            "shout": rng.random(n) < 0.1,
            "pad": rng.random(n) < 0.05,
            "zip1": rng.choice(10, n, p=[0.06, 0.14, 0.1, 0.12, 0.1, 0.06, 0.1, 0.1, 0.07, 0.15]),
            "zip4": rng.integers(0, 10000, n),
        }
    )
    email = pl.format("{}.{}{}@{}", "first", "last", "id", "domain")
    # Messy identifiers, as real exports have them: upper case and stray spaces on some e-mails.
    email = pl.when("shout").then(email.str.to_uppercase()).otherwise(email)
    email = pl.when("pad").then(pl.format(" {} ", email)).otherwise(email)
    df = frame.select(
        pl.format("C{}", pl.col("id").str.zfill(9)).alias("customer_id"),
        email.alias("email"),
        pl.format(
            "+1 (555) {}-{}",
            pl.lit(pl.Series(rng.integers(100, 999, n))),
            pl.lit(pl.Series(rng.integers(1000, 9999, n))),
        ).alias("phone"),
        pl.col("first").str.to_titlecase().alias("first_name"),
        pl.col("last").str.to_titlecase().alias("last_name"),
        pl.lit(pl.Series(birth)).dt.to_string("%Y-%m-%d").alias("birth_date"),
        pl.format("{}{}", "zip1", pl.col("zip4").cast(pl.String).str.zfill(4)).alias("postal_code"),
        pl.lit(_labels(GENDERS, rng.choice(4, n, p=[0.5, 0.46, 0.02, 0.02]))).alias("gender"),
        pl.lit(_labels(INCOME, rng.choice(5, n, p=[0.15, 0.3, 0.35, 0.12, 0.08]))).alias("income_band"),
        pl.concat_list(interest_cols).list.drop_nulls().list.join(";").alias("interests"),
        pl.lit(pl.Series(np.where(rng.random(n) < 0.8, "true", "false"))).alias("consent_marketing"),
        pl.lit(pl.Series(np.where(rng.random(n) < 0.6, "true", "false"))).alias("consent_sensitive"),
        pl.lit(pl.Series(today - rng.integers(30, 1800, n).astype("timedelta64[D]")))
        .dt.to_string("%Y-%m-%d")
        .alias("signup_date"),
    )
    return df, persona, stigma


def _events(
    rng: np.random.Generator,
    customer_ids: pl.Series,
    persona: np.ndarray,
    stigma: np.ndarray,
    as_of: datetime,
) -> pl.DataFrame:
    counts = np.maximum(rng.poisson(_P_MEAN[persona]), 1)
    owner = np.repeat(np.arange(len(persona)), counts)
    m = len(owner)
    p = persona[owner]
    etype = (rng.random(m)[:, None] > _P_CUM[p]).sum(axis=1)
    days_ago = _P_LO[p] + rng.random(m) * (_P_HI[p] - _P_LO[p])
    # Cart abandoners put things in the cart within the last week and never buy.
    cart = (p == _ABANDONER) & (etype == EVENT_TYPES.index("add_to_cart"))
    days_ago = np.where(cart, rng.random(m) * 7, days_ago)
    seconds = (days_ago * 86400).astype(np.int64)
    ts = (np.datetime64(as_of.replace(tzinfo=None), "s") - seconds.astype("timedelta64[s]")).astype(
        "datetime64[ms]"
    )

    category = rng.integers(0, len(CATEGORIES), m)
    # People with a stigmatized interest look at (and buy in) that category 40% of the time.
    owner_stigma = stigma[owner]
    has = owner_stigma.any(axis=1)
    which = np.argmax(owner_stigma * rng.random((m, 3)), axis=1)
    category = np.where(has & (rng.random(m) < 0.4), len(CATEGORIES) + which, category)
    is_product = _PRODUCT_EVENTS[etype]

    spend = rng.lognormal(np.log(np.where(p == _HIGH, 400.0, 55.0)), 0.6)
    value = np.where(np.isin(etype, [4, 5]), np.round(spend, 2), np.nan)
    coupon = etype == EVENT_TYPES.index("coupon_redeem")
    value = np.where(coupon, np.round(rng.uniform(5, 30, m), 2), value)

    campaign = rng.integers(0, len(CAMPAIGNS), m)
    sale = np.where(rng.random(m) < 0.5, 0, 1)  # spring_sale or clearance
    campaign = np.where(coupon | ((p == _DISCOUNT) & (etype == 5)), sale, campaign)
    has_campaign = coupon | _EMAIL_EVENTS[etype] | ((p == _DISCOUNT) & (etype == 5)) | (rng.random(m) < 0.15)
    variant = np.where(rng.random(m) < 0.5, 0, 1)

    frame = pl.DataFrame(
        {
            "customer_id": customer_ids.gather(pl.Series(owner, dtype=pl.UInt32)),
            "ts": pl.Series(ts).dt.replace_time_zone("UTC").dt.to_string("%Y-%m-%dT%H:%M:%SZ"),
            "event_type": _labels(EVENT_TYPES, etype),
            "product_category": _labels(ALL_CATEGORIES, category),
            "value": value,
            "campaign": _labels(CAMPAIGNS, campaign),
            "variant": _labels(("A", "B"), variant),
            "ip_address": pl.Series(rng.integers(1, 255, m)),
        }
    )
    return frame.select(
        "customer_id",
        "ts",
        "event_type",
        pl.when(pl.lit(pl.Series(is_product))).then("product_category").alias("product_category"),
        pl.col("value").fill_nan(None),
        pl.when(pl.lit(pl.Series(has_campaign))).then("campaign").alias("campaign"),
        pl.when(pl.lit(pl.Series(has_campaign))).then("variant").alias("variant"),
        pl.format("203.0.113.{}", "ip_address").alias("ip_address"),
    )


def generate(
    out_dir: Path,
    *,
    customers: int,
    seed: int = 0,
    as_of: datetime | None = None,
    chunk: int = 100_000,
    first_id: int = 1,
) -> DemoFiles:
    """Write ``customers.csv`` and ``events.csv`` (raw identifiers included) into ``out_dir``; customer
    numbers (and the identifiers made from them) start at ``first_id``, so that several calls with
    disjoint ranges make one population in several files."""
    if customers < 1:
        raise ValueError("customers must be at least 1")
    as_of = (as_of or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cust_path, ev_path = out_dir / "customers.csv", out_dir / "events.csv"
    n_customers = n_events = 0
    with open(cust_path, "w", encoding="utf-8") as cf, open(ev_path, "w", encoding="utf-8") as ef:
        for start in range(0, customers, chunk):
            n = min(chunk, customers - start)
            cust, persona, stigma = _customers(rng, first_id + start, n, as_of)
            ev = _events(rng, cust.get_column("customer_id"), persona, stigma, as_of)
            cust.write_csv(cf, include_header=start == 0)
            ev.write_csv(ef, include_header=start == 0, float_precision=2)
            n_customers += cust.height
            n_events += ev.height
    return DemoFiles(cust_path, ev_path, n_customers, n_events)
