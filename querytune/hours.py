"""Opening hours, day values and price levels: what search and the simulated world both know of a business catalog.

Weekly opening hours are stored per business as JSON, read into an array and asked "open at t?"; each price value
means some price levels, and each day value names some days.

The catalog's file (catalog.parquet: id, name, city, neighborhood, category, cuisine, price, rating, attributes, hours)
is written by `querytune.world` and read by `querytune.search`; neither imports the other's code for it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

MIN = 60  # minutes in an hour
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
DAY_VALUES = (*DAYS, "today", "tomorrow", "weekend")  # the day slot's values
PRICE_LEVELS = {
    "cheap": (1,),
    "moderate": (2,),
    "expensive": (3, 4),
    "affordable": (1, 2),
}  # price value -> catalog levels


def hours_array(hours_json: pd.Series) -> np.ndarray:
    """(n, 7, 2) int array of open/close minutes per weekday; closed days are (-1, -1)."""
    out = np.full((len(hours_json), 7, 2), -1, dtype=np.int32)
    for i, h in enumerate(hours_json):
        for day, span in json.loads(h).items():
            out[i, int(day)] = span
    return out


def open_at(hours: np.ndarray, weekday: int, minute: int) -> np.ndarray:
    """Which businesses are open on `weekday` (0=Mon) at `minute` after midnight (spill-over from the
    previous day's late close included)."""
    today = hours[:, weekday]
    yesterday = hours[:, (weekday - 1) % 7]
    return ((today[:, 0] <= minute) & (minute < today[:, 1])) | (yesterday[:, 1] > 24 * MIN) & (
        minute < yesterday[:, 1] - 24 * MIN
    )


def open_on(hours: np.ndarray, weekday: int) -> np.ndarray:
    return hours[:, weekday, 0] >= 0


def always_open(hours: np.ndarray) -> np.ndarray:
    return np.all((hours[:, :, 0] == 0) & (hours[:, :, 1] >= 24 * MIN), axis=1)


def resolve_weekday(day: str, ts_weekday: int) -> list[int]:
    """The weekdays (0=Mon) a day value names, seen from a query typed on `ts_weekday`."""
    if day == "today":
        return [ts_weekday]
    if day == "tomorrow":
        return [(ts_weekday + 1) % 7]
    if day == "weekend":
        return [5, 6]
    return [DAYS.index(day)]
