"""A procedurally sampled top-down driving scene: the ground truth every question is computed from.

Geometry is a grid, so a tiny vision tower can read it off 8x8 patches: 2 or 3 lanes (lane 0 is
the leftmost), four longitudinal rows relative to the ego car (``far`` and ``near`` ahead,
``beside``, ``behind``), at most one vehicle per (lane, row) cell. Above the rows lies a band with
an optional crosswalk (and a pedestrian crossing on it); a traffic light stands beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ROWS = ("far", "near", "beside", "behind")
KINDS = ("car", "truck")
COLOURS = ("red", "blue", "white", "black", "yellow")
LIGHTS = ("none", "red", "yellow", "green")
MAX_VEHICLES = 4
MAX_OBJECTS = 5
MAX_LANES = 3


@dataclass(frozen=True)
class Vehicle:
    """Another vehicle in cell (lane, row); never green (green is the ego's colour)."""

    kind: str
    lane: int
    row: str
    colour: str


@dataclass(frozen=True)
class Pedestrian:
    """``crossing``: on the crosswalk in ``lane``; else on the left sidewalk at ``row``."""

    crossing: bool
    lane: int = 0
    row: str = "far"


@dataclass(frozen=True)
class Scene:
    """Everything the renderer draws and the questions ask about."""

    n_lanes: int
    ego_lane: int
    light: str = "none"
    crosswalk: bool = False
    vehicles: tuple[Vehicle, ...] = ()
    pedestrians: tuple[Pedestrian, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.n_lanes not in (2, 3) or not 0 <= self.ego_lane < self.n_lanes:
            raise ValueError(f"bad lanes: n_lanes={self.n_lanes}, ego_lane={self.ego_lane}")
        if self.light not in LIGHTS:
            raise ValueError(f"bad light {self.light!r}")
        if len(self.vehicles) > MAX_VEHICLES or len(self.vehicles) + len(self.pedestrians) > MAX_OBJECTS:
            raise ValueError("too many objects")
        cells = set()
        for v in self.vehicles:
            if v.kind not in KINDS or v.colour not in COLOURS or v.row not in ROWS:
                raise ValueError(f"bad vehicle {v}")
            if not 0 <= v.lane < self.n_lanes or (v.lane, v.row) == (self.ego_lane, "beside"):
                raise ValueError(f"vehicle {v} off the road or on the ego car")
            if (v.lane, v.row) in cells:
                raise ValueError(f"two vehicles in cell {(v.lane, v.row)}")
            cells.add((v.lane, v.row))
        for p in self.pedestrians:
            if p.crossing and (not self.crosswalk or not 0 <= p.lane < self.n_lanes):
                raise ValueError(f"crossing pedestrian {p} needs a crosswalk lane")
            if not p.crossing and p.row not in ROWS:
                raise ValueError(f"bad pedestrian {p}")

    def vehicle_at(self, lane: int, row: str) -> Vehicle | None:
        return next((v for v in self.vehicles if v.lane == lane and v.row == row), None)


# Raw-draw priors, tuned (with ACTION_WEIGHTS) so that no question's majority answer is far above
# its share: see tests/test_synth.py::test_class_balance for the resulting answer frequencies.
P: dict = dict(
    three_lanes=0.75,            # P(3 lanes) else 2
    ego2=[0.4, 0.6],             # ego lane on 2 lanes (left, right)
    ego3=[0.22, 0.5, 0.28],      # ego lane on 3 lanes (left, middle, right)
    light=[0.4, 0.15, 0.12, 0.33],  # none, red, yellow, green
    crosswalk=0.45,
    crossing=0.35,               # P(crossing pedestrian | crosswalk)
    sidewalk=0.42,               # P(pedestrian on the left sidewalk)
    blocked=0.6,                 # P(first vehicle right ahead of the ego | any vehicle)
    far_weight=4.0,              # far-ahead cells are drawn 4x as often (they block nothing)
)
# Target frequencies of the ego action (``questions.sample_scene``'s ``action``): see ``synthesize``.
ACTION_WEIGHTS = {"stop": 0.28, "slow down": 0.2, "change left": 0.14, "change right": 0.14, "keep lane": 0.24}


def sample_raw_scene(rng: np.random.Generator) -> Scene:
    """Independent draws; the priors are tuned so each question's answers come out balanced-ish."""
    n_lanes = 3 if rng.random() < P["three_lanes"] else 2
    ego = int(rng.choice(3, p=P["ego3"])) if n_lanes == 3 else int(rng.choice(2, p=P["ego2"]))
    light = LIGHTS[int(rng.choice(4, p=P["light"]))]
    crosswalk = bool(rng.random() < P["crosswalk"])
    peds: list[Pedestrian] = []
    if crosswalk and rng.random() < P["crossing"]:
        peds.append(Pedestrian(crossing=True, lane=int(rng.integers(n_lanes))))
    if rng.random() < P["sidewalk"]:
        peds.append(Pedestrian(crossing=False, row=ROWS[int(rng.integers(4))]))
    n_veh = min(int(rng.integers(0, MAX_VEHICLES + 1)), MAX_OBJECTS - len(peds))
    cells = [(lane, row) for lane in range(n_lanes) for row in ROWS if (lane, row) != (ego, "beside")]
    chosen: list[tuple[int, str]] = []
    # Often the first vehicle sits right ahead of the ego car, so "blocked" scenes are common.
    if n_veh and rng.random() < P["blocked"]:
        chosen.append((ego, "near"))
    rest = [c for c in cells if c not in chosen]
    # Weighted draw without replacement (Efraimidis-Spirakis keys u ** (1 / w)).
    w = np.array([P["far_weight"] if row == "far" else 1.0 for _, row in rest])
    keys = rng.random(len(rest)) ** (1.0 / w)
    for i in np.argsort(-keys, kind="stable")[: n_veh - len(chosen)]:
        chosen.append(rest[int(i)])
    vehicles = tuple(
        Vehicle(kind=KINDS[int(rng.random() < 0.3)], lane=lane, row=row,
                colour=COLOURS[int(rng.integers(len(COLOURS)))])
        for lane, row in sorted(chosen, key=lambda c: (c[0], ROWS.index(c[1])))
    )
    return Scene(n_lanes=n_lanes, ego_lane=ego, light=light, crosswalk=crosswalk,
                 vehicles=vehicles, pedestrians=tuple(peds))
