"""Test fake of A1111 v1.10.1 ``modules/sd_hijack.py`` (reference §6.5), attention part only:
``model_hijack.optimization_method`` names the cross-attention optimization in use (None before one is applied);
the module-level ``undo_optimizations()`` puts the stock attention back and ``apply_optimizations(option=None)``
applies the chosen one again (returning its name). Nothing is replaced here: ``calls`` records both, in order."""
calls = []


def undo_optimizations():
    calls.append("undo")


def apply_optimizations(option=None):
    calls.append("apply")
    return model_hijack.optimization_method


class StableDiffusionModelHijack:
    optimization_method = None

    def apply_optimizations(self, option=None):
        self.optimization_method = apply_optimizations(option)


model_hijack = StableDiffusionModelHijack()
