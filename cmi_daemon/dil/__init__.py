"""The Dynamic Interaction Learner (paper section "Dynamic Interaction Learner").

- `losses`: the iteration-wise (eq. 2) and sample-wise (eq. 3) margin losses, and the distance
  variant of the authors' code, on span-mean representations;
- `examples`: what a signal means in token space (the piece with a given content in the range,
  the unsatisfied span, a neutral span);
- `adapter`: one profile's trainable JEPA copy, its optimizer and the gradient steps;
- `store`: profile folders on disk (weights + optimizer state in one safetensors file, the
  interaction log), every write atomic;
- `settings`: DILSettings, the config file's [dil] section (no torch import);
- `learner`: the daemon's SignalSink, running the steps on its own low-priority thread and
  handing the adapted weights to the engine.
"""
