"""run_plan: a config resolved once into its records and typed args, and a trainer that, once it
has resolved its config, looks no method, model or dataset name up again."""
import json

import pytest

from conftest import tiny_config
from fastadv_jax import methods, models
from fastadv_jax.data import datasets
from fastadv_jax.training import run_plan, train


def test_a_plan_holds_the_configs_records_and_args():
  c = tiny_config(method="pgd", model="cnn", method_args={"pgd": {"steps": 3}},
                  model_args={"cnn": {"n_filters": 6}})
  plan = run_plan.resolve(c)
  assert plan.method is methods.get("pgd") and plan.model is models.get("cnn")
  assert plan.method_args == methods.get("pgd").make_args({"steps": 3})
  assert plan.model_args.n_filters == 6
  assert plan.dataset is datasets.DATASETS[c.dataset] and plan.num_classes == 10
  assert run_plan.of(plan) is plan and run_plan.of(c) == plan
  # GradAlign's derivative: the model's choice for `auto`, double backprop through g1
  assert plan.gradalign_derivative == models.get("cnn").gradalign_derivative
  c.grad_align_backprop_g1 = True
  assert run_plan.resolve(c).gradalign_derivative == "double_backprop"


@pytest.mark.parametrize("field,value,match", [
    ("method", "nope", r"^config\.method: .*'nope'"),
    ("model", "nope", r"^config\.model: .*'nope'"),
    ("dataset", "nope", r"^config\.dataset: unknown dataset 'nope'"),
])
def test_a_name_that_does_not_resolve_is_one_line_naming_its_field(field, value, match):
  c = tiny_config()
  c[field] = value
  with pytest.raises(ValueError, match=match) as e:
    run_plan.resolve(c)
  assert "\n" not in str(e.value)


def test_a_bad_arg_names_its_field():
  c = tiny_config(model="cnn")
  c.model_args.cnn.n_filters = 0
  with pytest.raises(ValueError, match=r"^config\.model_args\.cnn\.n_filters: "):
    run_plan.resolve(c)


def test_the_trainer_looks_no_name_up_once_its_config_is_resolved(tmp_path, monkeypatch,
                                                                   mock_fashion_mnist):
  """After run_plan.resolve returns, a registry lookup of a method or a model raises: the run
  trains, evaluates and writes results.json on the plan alone."""
  resolved = []
  real_resolve, real_method, real_model = run_plan.resolve, methods.get, models.get

  def resolve(config):
    plan = real_resolve(config)
    resolved.append(plan)
    return plan

  def guarded(real, kind):
    def get(name):
      assert not resolved, f"{kind} {name!r} looked up after the config was resolved"
      return real(name)
    return get

  monkeypatch.setattr(run_plan, "resolve", resolve)
  monkeypatch.setattr(methods, "get", guarded(real_method, "method"))
  monkeypatch.setattr(models, "get", guarded(real_model, "model"))
  c = tiny_config(num_epochs=1, method="fgsm_rs", grad_align_lambda=0.5)
  results = train.train_and_evaluate(c, str(tmp_path))
  assert len(resolved) == 1
  assert results["method_args"] == json.loads(json.dumps(
      real_method("fgsm_rs").make_args({}).__dict__))
  assert (tmp_path / "results.json").exists()
