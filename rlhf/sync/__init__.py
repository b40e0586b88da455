"""Weight sync from the learners into the running engines.

* `wire`: what both sides share: the spec, the packed-bucket format, the store-backed group.
* `routes`: which learner rank feeds which engine worker, over which transport (a pure planner).
* `driver_side`: `WeightSync`, which plans the channels and runs a push on both sides at once.
* `learner_side`: the sending side, run by each learner rank (`send_to_channels`, `BackgroundSend`).
* `engine_side`: the receiving side, run inside each vLLM worker (`receive_buckets`).
* `engine_extension`: the methods mixed into vLLM's workers, which receive and load a push.
* `engine_replay`: replays recorded parameter copies, the fast path of loading a known bucket layout.
"""
