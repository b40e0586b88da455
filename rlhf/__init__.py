"""rlhf: RL post-training for LLMs on Ray (vLLM rollouts, reward actors, DeepSpeed learners).

Layers, each importing only those below it (tests/test_packaging.py checks this):
core (config, types, algorithms, data, tasks, user_code, environment, actor_group) -> sync, placement,
production -> roles (rollout, reward, trainer) -> evaluation -> loop -> cli.
"""

import os as _os

# In a source checkout (and in a Ray job's uploaded working directory) the role packages sit beside
# this folder, as rollout/, reward/ and trainer/; the wheel installs them inside it. Searching the
# checkout's root too makes `rlhf.rollout` import the same way in both.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "rollout")) and _os.path.isfile(
    _os.path.join(_root, "rollout", "__init__.py")
):
    __path__.append(_root)
