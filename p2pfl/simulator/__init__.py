"""Many node cores in one process over a simulated network on a virtual clock."""
