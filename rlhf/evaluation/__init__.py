"""Evaluation sets scored on the engines between steps or on engines of their own (`sets`), and the
end-of-run summary line (`summary`)."""
