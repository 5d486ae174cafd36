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
        "The fast clock: at speed 100 a simulated second is 10 ms of wall time, and the engine spends tens of "
        "milliseconds of CPU per wan2.6 task (a 1280*1280 PNG checked and hashed, its looks, its ledger commits), "
        "so whenever the event loop is held up the next create comes late against the quota in simulated time. "
        "The slow_clock rows run the same engine at speed 25, where the same delays weigh four times less; at "
        "real speed a hundred times less."
    ),
    "throttle": (
        "pacing.Pacer spaces creates on the wall clock (0.9 of the quota plus a guard of up to 10 ms per "
        "create); at speed 100 a simulated second is 10 ms of wall time, so an event loop held up for more than "
        "about 10 ms between a create's turn and its sending lets two creates reach the service within one "
        "simulated second. The AIMD step slows the lane after such a 429; at real speed the margin is a hundred "
        "times wider."
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
        "CPU-bound on two shared cores: at n=4 the engine spends about 2.3-2.8 CPU s per 1,000 images (most of it "
        "on its event loop's one thread, the rest in worker threads that check, hash and write the PNGs) and the "
        "simulator, which renders and serves every PNG, about 2.2 more, so the pair cannot pass about 400 "
        "images/s here (the steady parts measured 360-438); the engine's loop alone would stop near 450. At n=1 "
        "a task costs nearly as much for its one image. In the profile the HTTP client and SQLite lead with "
        "about a quarter each: 6 requests and some 40 statements and 7 commits per task (each state move is "
        "committed before the network action that depends on it, each saved image is its own commit, settling "
        "its item with the last), then the event loop. Fix: commit the images that end in the same turn of the "
        "loop together (their files are renamed first, so a kill loses nothing), fewer awaits per request, and "
        "on a machine with more cores the simulator in a process of its own no longer takes the engine's."
    ),
    "one_prompt": (
        "Items sharing a prompt go one at a time: submit.Submitter._pass holds a row while a create of the same "
        "prompt is unanswered (the task list tells tasks apart by prompt only, so a second one in doubt would "
        "make an unknown outcome ambiguous: the price of never paying twice), and each pass reads on through the "
        "lane's planned rows in pages to find one it may send; with every row sharing one prompt a pass reads "
        "them all (Ledger.iter_items), so the cost grows with the repeats. Fix: keep a lane's held rows in "
        "memory by prompt and resume a pass where it stopped."
    ),
}
