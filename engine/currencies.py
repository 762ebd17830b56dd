"""ISO 4217 currency codes: a campaign and an order name one of these, so a typo such as
``EUD`` is refused where it is made instead of silently matching nothing."""

from __future__ import annotations

from engine import errors

# The active codes of ISO 4217 (list one, funds and precious metals left out, the
# testing code XTS too); a shop's own unit of account is not a currency.
ISO_4217: frozenset[str] = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD
    BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB
    EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK
    JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA
    MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK
    PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN
    SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV
    WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """.split()  # noqa: SIM905 (a table is easier to read as text)
)


def check_currency(value: object, field: str) -> str:
    """``value`` if it is an ISO 4217 code; raises :class:`errors.UnknownCurrency`."""
    if not isinstance(value, str) or value not in ISO_4217:
        raise errors.UnknownCurrency(f"{field} must be an ISO 4217 currency code such as EUR, got {value!r}")
    return value
