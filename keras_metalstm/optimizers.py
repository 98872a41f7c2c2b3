"""Adam with a per-variable learning-rate multiplier, so theta_0 and the update rule can move at different speeds.

Adam's step is invariant to the gradient's scale, so scaling theta_0's meta-gradient cannot slow theta_0 down; the
learning rate itself has to differ. One optimizer (rather than one per group) keeps a single update counter, a
single learning-rate schedule and the checkpoint layout of plain Adam.
"""

import keras


@keras.saving.register_keras_serializable(package="keras_metalstm")
class MultiplierAdam(keras.optimizers.Adam):
    """Adam whose step for a variable named in `learning_rate_multipliers` is multiplied by its value.

    Args:
        learning_rate: Adam's step (a float or a schedule) for every other variable.
        learning_rate_multipliers: {variable name: multiplier >= 0}; e.g. {"theta0": 0.1}. 0 freezes the
            variable (its moments are still updated, so a later non-zero multiplier resumes smoothly).
        **kwargs: passed to keras.optimizers.Adam.
    """

    def __init__(self, learning_rate=1e-3, learning_rate_multipliers=None, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        multipliers = dict(learning_rate_multipliers or {})
        for name, multiplier in multipliers.items():
            if not float(multiplier) >= 0:
                raise ValueError(f"The learning-rate multiplier of {name!r} must be >= 0, got {multiplier!r}.")
        self.learning_rate_multipliers = {name: float(value) for name, value in multipliers.items()}
        self._variable_multipliers = []

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        known = {variable.name for variable in variables}
        unknown = sorted(set(self.learning_rate_multipliers) - known)
        if unknown:
            raise ValueError(
                f"learning_rate_multipliers names {unknown}, which are not among the optimised variables "
                f"{sorted(known)}."
            )
        self._variable_multipliers = [self.learning_rate_multipliers.get(variable.name, 1.0) for variable in variables]

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self._variable_multipliers[self._get_variable_index(variable)]
        if multiplier != 1.0:
            learning_rate = keras.ops.multiply(learning_rate, multiplier)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["learning_rate_multipliers"] = dict(self.learning_rate_multipliers)
        return config
