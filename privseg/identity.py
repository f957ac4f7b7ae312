"""The kinds of direct identifier privseg pseudonymizes (the ingest policy's ``identity.type``).

Its own module so that reading a policy does not import the pseudonymizer (and with it Polars and
numpy): `privseg budget` and other commands that only read policies start in a fraction of the time.
"""

from __future__ import annotations

from enum import StrEnum


class IdType(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    CUSTOMER_NUMBER = "customer_number"
