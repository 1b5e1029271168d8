"""A training process's life: the process group (:mod:`.env`), stop signals (:mod:`.preemption`),
exiting when the torchrun agent dies (:mod:`.orphan`) and the exit codes and status file
(:mod:`.exit_codes`)."""
