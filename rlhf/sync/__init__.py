"""Weight sync from the learners into the running engines.

`wire` is the format both sides share (spec, buckets, packing); `routes` picks the channels;
`driver_side` (`WeightSync`) orchestrates a push; the learner side sends (`wire.send_buckets`);
`engine_extension` (inside vLLM's workers) receives and loads, through `engine_replay` when it can.
"""
