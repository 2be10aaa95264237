"""An ``evaluate`` metric for continual learning, loadable from a local path (no Hub needed)::

    import evaluate
    from peft_gp.continual import EVALUATE_METRIC_PATH

    metric = evaluate.load(EVALUATE_METRIC_PATH)
    metric.add_batch(predictions=preds, references=labels, trained_task=[t] * n, evaluated_task=[k] * n)
    metric.compute()  # average accuracy, average incremental accuracy, forgetting, backward transfer, matrix

Each example says after which task the model was evaluated (``trained_task``, 0-based) and which task's test set it
comes from (``evaluated_task``); the metric builds the accuracy matrix ``R[t][k]`` and applies
``peft_gp.core.metrics`` (conventions in that module).
"""

import datasets
import evaluate

from peft_gp.core.metrics import accuracy_matrix_summary

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (int).
    references: true labels (int).
    trained_task: 0-based index of the last task trained when the prediction was made.
    evaluated_task: 0-based index of the task whose test set the example belongs to (<= trained_task).
Returns:
    average_accuracy, average_incremental_accuracy, forgetting, backward_transfer, accuracy_matrix.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ContinualLearning(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "trained_task": datasets.Value("int64"),
                    "evaluated_task": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, trained_task, evaluated_task):
        counts: dict[tuple[int, int], list[int]] = {}
        for prediction, reference, trained, evaluated in zip(predictions, references, trained_task, evaluated_task):
            if evaluated > trained:
                raise ValueError(f"evaluated_task {evaluated} > trained_task {trained}: that task was not seen yet.")
            correct_total = counts.setdefault((trained, evaluated), [0, 0])
            correct_total[0] += int(prediction == reference)
            correct_total[1] += 1
        tasks = 1 + max(trained for trained, _ in counts)
        matrix = [
            [counts[(t, k)][0] / counts[(t, k)][1] if (t, k) in counts else None for k in range(t + 1)]
            for t in range(tasks)
        ]
        return {**accuracy_matrix_summary(matrix), "accuracy_matrix": matrix}
