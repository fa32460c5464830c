"""GPU-free verification tools: compile every kernel for the real chips on a CPU machine."""
