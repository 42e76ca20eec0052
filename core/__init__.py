"""loopstream's core: the event envelope, codec, state machine, fold, log, and runtime."""
