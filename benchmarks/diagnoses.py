"""Why a figure of the benchmark misses its target, and what to change: one entry per kind of miss.

Found with the request counts, profiles and code reading of the run that wrote the benchmark; the
table (benchmarks/report.py) cites an entry only while its figure misses, so a fixed engine drops it.
Each names the module and function to change.
"""

from __future__ import annotations

__all__ = ["DIAGNOSES"]

#: Why a figure misses its target and what to change, from the profiles and request counts of this benchmark.
DIAGNOSES: dict[str, str] = {
    "utilisation": (
        "wan2.6 (and any items sharing a prompt): submit.Lane.doubt_key is '' for wan2.6, whose results carry "
        "no prompt, so one create is in flight at a time; after each dispatch Submitter._lane_loop starts a new "
        "Submitter._pass from the first planned row and reads every planned row again, held back one by one "
        "(Ledger.iter_items, records.ItemRow.from_row: about 80 µs a row), and once more after "
        "wait_event(lane.changed). Each create thus costs CPU in proportion to the items still planned (2,000 "
        "rows: about 0.15 s, 15 simulated s at speed 100), so creates come slower than the service's five slots "
        "free up. At real speed the same happens from about 10,000 items, when a pass outlasts the second "
        "between creates. Fix: continue a pass after the dispatched row instead of from seq 0, and when rows are "
        "held wait for lane.changed and resume there (a small in-memory queue of planned rows per lane), so a "
        "create costs O(1) ledger reads."
    ),
    "throttle": (
        "pacing.Pacer spaces creates on the wall clock (0.9 of the quota plus a 10 ms guard per create); at speed "
        "100 a simulated second is 10 ms of wall time, so an event loop held up for more than about 10 ms between "
        "a create's turn and its sending (here by the re-reading of diagnosis 1) lets two creates reach the "
        "service within one simulated second. On the slower clock, and at real speed, the margin is 100 times "
        "wider. Fix: that of diagnosis 1; the AIMD step already slows the lane after such a 429."
    ),
    "tracking": (
        "By design of the default policy (track.py, policy='prompt'): to see an end within about 1 s at the "
        "median, a task that may have ended is looked at every 1.6 s from the shortest recent running time on, "
        "and running times spread ±30 %, so a flash task gets several looks (a page of the task list replaces "
        "them when more than one task of the region is likely still running, which is why wan2.6, five at a "
        "time, costs less). The task list shows no results, so each task also costs one query for its images. "
        "No policy meets 1.2 requests per task and the lag targets together at these rates of ends "
        "(benchmarks/README.md, 'Tracking cost against detection lag'); --tracking frugal meets the 1.2 (see "
        "its column) at the lag of figure 3. Queries cost no money, only their share of the account's 20 per "
        "second."
    ),
    "lag": (
        "The looks come on the engine's clock at the fast simulated speed, where every millisecond the event "
        "loop is late (downloads, PNG checks and the ledger share it) is a tenth of a simulated second; with the "
        "cores busy a look can come seconds late in simulated time. On the slower clock of the slow_clock rows "
        "and at real speed the same delays are 4 and 100 times smaller. With --tracking frugal the lag is the "
        "spread of running times by design."
    ),
    "ceiling": (
        "CPU-bound on two shared cores: the engine spends about 3-3.7 CPU s per 1,000 images at n=4 (its event "
        "loop's thread 2.1-2.6 ms an image, the rest in its worker threads) and the simulator about 2.5 more "
        "(it renders every PNG), so the pair cannot pass about 350 images/s here even alone on the machine; at "
        "n=1 a task costs about 8 ms for its one image. In the profile SQLite leads with about a quarter: some "
        "40 statements and 7 commits per task (each state move is committed before the network action that "
        "depends on it, and each saved image is its own commit, settling its item with the last), then aiohttp's "
        "per-request work (6 requests per task) and the event loop. Fix: commit the images that end in the same "
        "turn of the loop together (their files are renamed first, so a kill loses nothing), fewer awaits per "
        "request, and a simulator that serves images at less CPU than the engine spends on them."
    ),
    "one_prompt": (
        "Items sharing a prompt go one at a time: submit.Submitter._pass holds a row while lane.doubt has a "
        "create of the same prompt in flight (so that the task list could tell unknown outcomes apart), and "
        "every pass re-reads and parses all the lane's planned rows (Ledger.iter_items, ItemRow.from_row: four "
        "json.loads and dataclasses.fields per row): quadratic in the repeats. With 2,000 repeats of one prompt "
        "(measured while writing this benchmark) the engine saved 20 images/s at 50 CPU s per 1,000 images. "
        "Fix: hold a prompt back only once a create of it is in doubt (unknown outcome), not while it is merely "
        "in flight; keep held rows in memory rather than re-reading from the first seq."
    ),
    "plan": (
        "wanbatch plan expands every item twice (Manifest.validate, then plan.make_plan), at about 50 µs per "
        "item per pass in manifest._entry_items/_items (a dict per item, canonical JSON and sha256 of the item "
        "id, which a plan does not need). Fix: validate and count in one pass, and expand without ids when only "
        "counting."
    ),
    "resume": (
        "A resume expands the whole manifest three times before its first request: api.run "
        "(Manifest.validate, then plan.make_plan for the budget check) and Engine.run (Ledger.add_items, "
        "which also upserts every row to mark it seen). Fix: keep the manifest's digest in the ledger's meta and, "
        "when it is unchanged, skip validation and planning and submit from the ledger at once; otherwise plan "
        "in the background while the submitter already sends the planned rows."
    ),
}
