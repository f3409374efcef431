"""Full verification of a cache: every file's size and checksum, every count (`kd cache verify`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import CacheError
from .manifest import Manifest
from .storage import Location, checksum_bytes

VERIFY_BATCH = 256  # samples decoded per read


@dataclass
class VerifyReport:
    path: str
    ok: bool = True
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)


def verify_cache(url: str) -> VerifyReport:
    """Check everything a reader relies on; collects all problems rather than stopping at one."""
    from .reader import CacheReader

    report = VerifyReport(path=str(url))
    try:
        reader = CacheReader(url)
    except CacheError as e:
        report.fail(str(e))
        return report
    for link in reader.chain:  # a child cache and every parent it grows (SPEC.md section 11)
        _check_files(link.location, link.manifest, report)
    if report.ok:  # decode everything once: catches arrays whose shapes lie about counts
        try:
            ids = reader.sample_ids
            for i in range(0, len(ids), VERIFY_BATCH):
                for s in reader.get_many(ids[i : i + VERIFY_BATCH]):
                    if s.ids.shape[0] != s.num_tokens:
                        report.fail(f"{reader.location.url}: sample {s.sample_id!r} arrays disagree in length")
        except (CacheError, ValueError) as e:
            report.fail(str(e))
    return report


def _check_files(loc: Location, manifest: Manifest, report: VerifyReport) -> None:
    """Every file one cache's manifest lists: present, of its size and checksum; none unlisted."""
    for entry in manifest.shards:
        on_disk = loc.walk_files(entry.path)
        listed = {f"{entry.path}/{rel}" for rel in entry.files}
        for extra in sorted(set(on_disk) - listed):
            report.fail(f"{loc.url}/{extra}: file not listed in the manifest")
        for rel, meta in entry.files.items():
            path = f"{entry.path}/{rel}"
            report.files_checked += 1
            try:
                data = loc.read_bytes(path)
            except (FileNotFoundError, OSError) as e:
                report.fail(f"{loc.url}/{path}: missing or unreadable ({e.__class__.__name__})")
                continue
            except CacheError as e:
                report.fail(str(e))
                continue
            if len(data) != meta.size:
                report.fail(f"{loc.url}/{path}: size {len(data)} != {meta.size} (truncated or extended)")
            elif checksum_bytes(data) != meta.xxh3_128:
                report.fail(f"{loc.url}/{path}: checksum mismatch")
