"""The models and their training: everything the train stage (stages/train.py) runs, as a library.

Reading order:

1. networks.py   ResnetGenerator, PatchDiscriminator (both optionally antialiased), PatchSampleF
                 (CUT's F), init_weights: the networks every model uses (checkpoint.py builds
                 generators from them for evaluate, translate and export).
2. training.py   TrainParams (params.yaml's `train`), Model: the interface a model offers the
                 shared code below, and the wrappers (channels-last check, DDP, torch.compile).
3. cyclegan.py   CycleGAN: its pair modules, losses, train_step in the reference order, sample
                 rows; pool.py (ImagePool) is its image history.
   cut.py        CUT and FastCUT (train.model): G, D, F, PatchNCE, train_step in the reference
                 order; one generator, A→B.
4. schedule.py   lr_factor: the linear learning-rate rule.
5. state.py      TrainState (last.pt's one format), run identity, resume / extend / move aside,
                 epoch-file repair, the divergence checks.
6. feeding.py    where the training images live (train.data_device) and the feeders of batches.
7. loop.py       the device set-up, the start of a run on every rank, one epoch of steps.
8. samples.py, live.py, progress.py   rank 0's outputs: sample grids, dvclive logs, progress lines;
                 writer.py writes them (and the checkpoints) off the training thread.

A new model is one module beside cyclegan.py and cut.py: a class with what training.Model names,
chosen by train.model in the train stage and passed to loop.start_run. Nothing is imported
here: `import unpaired.models.networks` (what checkpoint.py needs) loads no training code.
"""
