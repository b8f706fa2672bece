"""What every training run shares: conversation data, the data order and per-sample noise, processes under
`torchrun`, checkpoints, and the optimisation loop."""
