"""What runs where, after what: the stage graph, submission through submitit, the Slurm scheduler and the run state."""
