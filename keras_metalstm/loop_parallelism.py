"""How many iterations of a `tf.map_fn` over a learner's passes may run at once: a workaround for a TensorFlow bug.

TensorFlow's graph optimiser rewrites a convolution whose output is added to another branch (Conv2D [+ BiasAdd] +
Add: a residual connection) into one oneDNN CPU kernel, `_MklNativeFusedConv2D`. When the other branch's tensor
is still needed elsewhere (as it is in a gradient), that kernel copies it into its output through buffers it
keeps in the kernel object, which every iteration of a loop shares. A `tf.map_fn` runs up to 10 iterations at
once, so two iterations free each other's buffers and the process dies with a segmentation fault (TensorFlow
2.21: a plain `tf.map_fn` over such a convolution, no library code, crashes at once; inside the meta-learner, now
and then on the first call of a per-episode step). One iteration at a time never shares the kernel; XLA and
GPU/TPU kernels are not affected.

So on a machine without a GPU or TPU, a loop over a learner that might hold such a fusion runs its iterations one
at a time. Which learners might: any that is not a chain of Keras' own layers (a merge of two branches, a layer or
model of your own whose `call` TensorFlow's optimiser sees only as ops). A chain (conv4, most Sequential models)
keeps TensorFlow's parallel iterations: one at a time costs conv4 1.18-1.27x per episode at meta-batch 4 on a
2-core CPU (`benchmarks/loop_parallelism.py`).
"""

import keras
import tensorflow as tf

from keras_metalstm.batched_learner import graph_layers, is_graph_model
from keras_metalstm.xla_ops import accelerator_present


def is_chain_of_keras_layers(model) -> bool:
    """Whether `model` is a Sequential or functional model (nested ones included) whose every operation is one of
    Keras' own layers taking a single tensor: no branch is ever added to another."""
    if not isinstance(model, keras.Model) or not is_graph_model(model):
        return False
    for operation in graph_layers(model):
        if isinstance(operation, keras.Model):
            if not is_chain_of_keras_layers(operation):
                return False
            continue
        if isinstance(operation, keras.layers.InputLayer):
            continue
        if not type(operation).__module__.startswith("keras."):
            return False
        if any(len(node.input_tensors) > 1 for node in operation._inbound_nodes):
            return False
    return True


def learner_parallel_iterations(learner):
    """`parallel_iterations` for a tf.map_fn whose iterations run the Keras model `learner`: 1 on a CPU-only
    machine unless it is a chain of Keras layers (`is_chain_of_keras_layers`), else None (TensorFlow's default)."""
    return None if accelerator_present() or is_chain_of_keras_layers(learner) else 1


def map_learner_passes(function, elements, output_signature, learner):
    """`function` of each element of the stacked `elements` (episodes, or a baseline's settings), stacked: a
    tf.map_fn whose iterations run the Keras model `learner`, or for a single element a plain call.

    The loop costs little by itself, but it splits a step into the loop's function and its gradient's, and
    oneDNN's max-pooling gradient needs the forward pass in the same graph: without the loop, a 5-shot 84x84
    episode on a CPU took 432 ms instead of 483. The iterations run one at a time where TensorFlow's CPU kernels
    might crash otherwise (`learner_parallel_iterations`, read when the loop is traced).
    """
    if tf.nest.flatten(elements)[0].shape[0] == 1:
        outputs = function(tf.nest.map_structure(lambda tensor: tensor[0], elements))
        return tf.nest.map_structure(lambda tensor: tf.convert_to_tensor(tensor)[tf.newaxis], outputs)
    return tf.map_fn(
        function,
        elements,
        fn_output_signature=output_signature,
        parallel_iterations=learner_parallel_iterations(learner),
    )
