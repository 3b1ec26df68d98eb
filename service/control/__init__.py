"""Control, in the engine's process: which tier serves (the autoswitcher, from the load and the
tiers' measured costs) and which requests get in (admission)."""
