"""The simulated Wan text-to-image service (DashScope API), in-process or as ``wanbatch sim``.

    from wanbatch.sim import SimConfig, create_app, running_sim, FAULT_PROFILES

docs/simulator.md describes what it does, its configuration, and the behaviour
chosen for each open question of the wire spec.
"""

from wanbatch.sim.app import SIM_STATE, create_app
from wanbatch.sim.config import DEMO_KEYS, AccountConfig, SimConfig
from wanbatch.sim.faults import FAULT_PROFILES, Fault
from wanbatch.sim.handle import SimHandle, TaskView, running_sim
from wanbatch.sim.tasks import TaskStatus

__all__ = [
    "DEMO_KEYS",
    "FAULT_PROFILES",
    "SIM_STATE",
    "AccountConfig",
    "Fault",
    "SimConfig",
    "SimHandle",
    "TaskStatus",
    "TaskView",
    "create_app",
    "running_sim",
]
