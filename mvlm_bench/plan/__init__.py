"""What to measure: configurations x repetitions, every value and input checked before anything is pushed."""
