"""What the tests share beyond fixtures (those are in tests/conftest.py), one module per concern:

- ``paths``: the repository root and the tests' data folders;
- ``manifest``: writing a manifest from YAML text or from prompts (:func:`helpers.manifest.write_manifest`);
- ``engine``: the engine in-process against a simulator (``engine_for``, ``run_batch``, ``run_stopped_when``);
- ``sim``: creates sent as the engine sends them, waits on what an in-process simulator received;
- ``unkind``: the simulator made unkinder by middlewares, and any app served on a free loopback port;
- ``sdk``: the simulator in a thread of its own, for the synchronous dashscope SDK;
- ``proc``: ``wanbatch sim`` and ``wanbatch run`` as processes, and the command line run to its end;
- ``ledger``: a run's ledger read from outside, or left as a crash leaves it;
- ``outputs``: a run folder's metadata, and its audit against the billing log;
- ``seaweed``: a real S3-compatible server (SeaweedFS) for the output stores' tests;
- ``source``: the package's source read as syntax (every parameter of every function), for checks on its code.

``tests/`` is on the import path (``pythonpath`` in pyproject.toml), so this folder is a package imported as
``helpers``. The test folders are not packages: pytest imports each test file by its base name, which is why
those names are unique across folders.
"""
