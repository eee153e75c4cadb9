"""Engine: select -> gather -> prefill -> decode, one mask per reply, streamed."""
