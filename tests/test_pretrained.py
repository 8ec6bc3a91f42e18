"""Networks from torchvision and timm by name, their weights, and training on a frozen backbone.

``create_model("torchvision:NAME" / "timm:NAME", weights=...)`` (eefast.models.external), the
schedules that freeze the backbone (eefast.train), and ``eefast train --backbone ... --weights FILE
--freeze-backbone`` from weights the test saves itself (no test needs the network).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import eefast
from eefast import cli
from eefast.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from eefast.models.external import RepeatChannels
from eefast.train import Phase, TrainConfig, Trainer, training_phases

torchvision = pytest.importorskip("torchvision")
MNIST = dict(num_classes=10, input_shape=(1, 28, 28))


def network_state(name: str = "mobilenet_v3_small", num_classes: int = 1000, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, num_classes=num_classes).state_dict()


def stage_state(model: eefast.EENet) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith("stages.")}


def test_torchvision_and_timm_names_build_eenets():
    for name in ("torchvision:mobilenet_v3_small", "torchvision:resnet18", "timm:resnet18"):
        model = eefast.create_model(name, num_exits=2, **MNIST)
        assert isinstance(model, eefast.EENet) and model.num_exits == 3 and model.input_shape == (1, 28, 28)
        assert isinstance(model.stages[0][0][0], RepeatChannels)  # MNIST's grey channel, shown as RGB
        model.eval()
        prediction = model(torch.randn(3, 1, 28, 28))
        assert prediction.logits.shape == (3, 10)
    rgb = eefast.create_model("torchvision:resnet18", num_exits=1, num_classes=4, input_shape=(3, 32, 32))
    assert not any(isinstance(m, RepeatChannels) for m in rgb.modules())


def test_unknown_names_and_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="did you mean mobilenet_v3_small"):
        eefast.create_model("torchvision:mobilenet_v3_smal")
    with pytest.raises(ValueError, match="unknown model .keras:resnet50.; expected one of .*, or torchvision:NAME"):
        eefast.create_model("keras:resnet50")
    with pytest.raises(ValueError, match="unexpected argument 'filters'"):
        eefast.create_model("timm:resnet18", filters=4)
    with pytest.raises(ValueError, match="takes 3-channel images"):
        eefast.create_model("torchvision:resnet18", num_classes=10, input_shape=(2, 28, 28))


def test_weights_from_a_file_load_every_tensor_but_another_classifier(tmp_path):
    state = network_state()  # ImageNet's 1000 classes
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # a DDP training checkpoint
    rgb = dict(num_classes=10, input_shape=(3, 28, 28))
    model = eefast.create_model("torchvision:mobilenet_v3_small", weights=str(path), num_exits=2, **rgb)
    network = torchvision.models.mobilenet_v3_small(num_classes=10)
    fresh = {k for k in network.state_dict() if k.startswith("classifier.3.")}  # the last layer: 10 classes
    network.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    want = eefast.EENet.from_backbone(network, num_exits=2, **rgb).state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    differ = {k for k in got if not k.startswith("exits.") and not torch.equal(got[k], want[k])}
    assert differ == {"classifier.2.3.weight"}  # random, of its own shape (its bias starts at 0 in both)
    assert got["classifier.2.3.weight"].shape == (10, 1024)


def test_weights_of_another_network_are_refused_with_what_differs(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(network_state("resnet18"), path)
    with pytest.raises(ValueError, match=r"expected the state dict of a MobileNetV3 .* unexpected \['bn1.bias'"):
        eefast.create_model("torchvision:mobilenet_v3_small", weights=str(path), **MNIST)
    checkpoint = tmp_path / "eefast.pt"
    save_checkpoint(checkpoint, {"model_name": "eenet8", "model_kwargs": {}, "model_state": {}})
    with pytest.raises(ValueError, match="an eefast checkpoint"):
        eefast.create_model("torchvision:mobilenet_v3_small", weights=str(checkpoint), **MNIST)
    with pytest.raises(ValueError, match=r"expected a file, or one of torchvision's weights .*IMAGENET1K_V1"):
        eefast.create_model("torchvision:mobilenet_v3_small", weights="imagenet", **MNIST)


def test_named_torchvision_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    """torchvision's named weights, found where torch.hub keeps downloads (put there by the test)."""
    entry = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    state = network_state(seed=3)
    torch.save(state, tmp_path / "hub" / "checkpoints" / entry.url.rsplit("/", 1)[1])
    model = eefast.create_model("torchvision:mobilenet_v3_small", weights="DEFAULT", num_exits=1, num_classes=1000,
                                input_shape=(3, 32, 32))
    network = torchvision.models.mobilenet_v3_small()
    network.load_state_dict(state)
    want = eefast.EENet.from_backbone(network, num_exits=1, input_shape=(3, 32, 32)).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items() if not k.startswith("exits."))


def test_named_timm_weights_offline_say_so(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # (read at import from the environment)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(OSError, match=r"timm could not load the pretrained weights of resnet18 \(.*give a local file"):
        eefast.create_model("timm:resnet18", weights="pretrained", **MNIST)


def test_weights_keep_module_versions_and_may_lack_batch_counts(tmp_path):
    """MNASNet's loading reads the version its state dict records; num_batches_tracked may be absent
    (older files), as torch's own loading allows. Both were refused before."""
    path = tmp_path / "mnasnet.pth"
    torch.save(network_state("mnasnet0_5", num_classes=10), path)
    model = eefast.create_model("torchvision:mnasnet0_5", weights=path, num_exits=1, num_classes=10,
                                input_shape=(3, 32, 32))
    assert torch.equal(model.stages[0][0][0].weight, torch.load(path)["layers.0.weight"])
    state = {k: v for k, v in network_state("resnet18", num_classes=10).items() if "num_batches_tracked" not in k}
    torch.save(state, path)
    model = eefast.create_model("torchvision:resnet18", weights=str(path), num_exits=1, num_classes=10,
                                input_shape=(3, 32, 32))
    assert torch.equal(model.classifier[-1].weight, state["fc.weight"])


def test_a_timm_classifier_of_another_shape_starts_random_with_a_warning():
    timm = pytest.importorskip("timm")
    from eefast.models.external import load_weights

    torch.manual_seed(0)
    state = timm.create_model("dla46_c", num_classes=1000).state_dict()  # its classifier: a 1x1 convolution
    network = timm.create_model("dla46_c", num_classes=10)
    with pytest.warns(UserWarning, match=r"the classifier 'fc' starts random \(fc.bias \[10\], fc.weight \[10, 256"):
        load_weights(network, state)
    assert all(torch.equal(v, state[k]) for k, v in network.state_dict().items() if not k.startswith("fc."))


def test_weights_that_are_not_there_or_not_a_run_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights runs/w.pth: expected a weights file there, found none"):
        eefast.create_model("timm:resnet18", weights="runs/w.pth", **MNIST)
    assert eefast.create_model("torchvision:resnet18", weights=None, num_exits=1, **MNIST).num_exits == 2
    payload = {"model_name": "torchvision:resnet18", "model_kwargs": {"weights": "DEFAULT", **MNIST},
               "model_state": {}}
    with pytest.raises(ValueError, match="expected no 'weights' among its arguments"):
        model_from_checkpoint(payload)
    with pytest.raises(ValueError, match="expected --weights"):
        Trainer(TrainConfig(model="torchvision:resnet18", extra={"weights": "DEFAULT"}, out=str(tmp_path)))


def test_resume_of_a_frozen_backbone_run_needs_no_weights_file(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(network_state(num_classes=10), weights)
    config = dict(model="torchvision:mobilenet_v3_small", weights=str(weights), schedule="frozen-backbone",
                  epochs=1, batch_size=256, quiet=True, plots=False, out=str(tmp_path / "run"))
    first = Trainer(TrainConfig(**config))
    first.splits.train = torch.utils.data.Subset(first.splits.train, range(256))
    summary = first.run()
    weights.unlink()  # the checkpoint holds the model: the file is not read again
    resumed = Trainer(TrainConfig(**config, resume=True))
    assert resumed.start_epoch == 1 and resumed.run()["weights_sha256"] == summary["weights_sha256"]


def test_an_exported_timm_model_deploys_with_predicts_exits(tmp_path):
    from eefast.export import export_onnx

    sys = pytest.importorskip("sys")
    pytest.importorskip("onnxruntime")
    model = eefast.create_model("timm:resnet18", num_exits=2, **MNIST).eval()
    x = torch.randn(12, 1, 28, 28)
    model.threshold = model.thresholds_for_fractions(x, [0.5, 0.25])
    export_onnx(model, tmp_path / "onnx")
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(tmp_path / "onnx"))
        patch.delitem(sys.modules, "deploy", raising=False)
        import deploy

        served = deploy.ExportedEENet(tmp_path / "onnx").predict(x.numpy())
        patch.delitem(sys.modules, "deploy")
    want = model.predict(x)
    assert served.exit.tolist() == want.exit.tolist() and len(set(served.exit.tolist())) == 3
    assert torch.allclose(torch.from_numpy(served.logits), want.logits, rtol=0, atol=1e-4)


def test_checkpoints_rebuild_external_models(tmp_path):
    model = eefast.create_model("torchvision:mobilenet_v3_small", num_exits=2, **MNIST)
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"model_name": "torchvision:mobilenet_v3_small", "model_kwargs": {"num_exits": 2, **MNIST},
                           "model_state": model.state_dict()})
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(rebuilt.eval()(x).logits, model.eval()(x).logits)


def test_schedule_phases():
    assert training_phases(TrainConfig(epochs=6, schedule="frozen-backbone")) == [Phase("heads", 0, 6)]
    assert training_phases(TrainConfig(epochs=6, schedule="exits-then-joint")) == [Phase("heads", 0, 1),
                                                                                   Phase("joint", 1, 6)]
    assert training_phases(TrainConfig(epochs=6, exit_epochs=2, schedule="backbone-first")) == [
        Phase("backbone", 0, 4), Phase("exits", 4, 6)]
    assert training_phases(TrainConfig(epochs=1, schedule="exits-then-joint")) == [Phase("joint", 0, 1)]


@pytest.mark.parametrize("schedule", ["frozen-backbone", "exits-then-joint"])
def test_frozen_stages_stay_bit_identical(tmp_path, schedule):
    """The phase on the frozen stages trains the exits and the final classifier; the stages' weights
    and batch-norm statistics do not move. exits-then-joint then trains every part."""
    from eefast.train import Interruption

    config = TrainConfig(model="torchvision:mobilenet_v3_small", epochs=2, exit_epochs=1, schedule=schedule,
                         batch_size=256, quiet=True, plots=False, out=str(tmp_path))
    trainer = Trainer(config)
    trainer.splits.train = torch.utils.data.Subset(trainer.splits.train, range(512))
    model = trainer.model
    stages = {k: v.clone() for k, v in stage_state(model).items()}
    heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("stages.")}
    with Interruption() as interruption:
        trainer._train_epoch(0, interruption)
        assert all(torch.equal(v, stages[k]) for k, v in stage_state(model).items())
        moved = [k for k, v in model.state_dict().items() if k in heads and not torch.equal(v, heads[k])]
        assert any(k.startswith("exits.") for k in moved) and any(k.startswith("classifier.") for k in moved)
        if schedule == "exits-then-joint":
            trainer._train_epoch(1, interruption)
            assert not torch.equal(stage_state(model)["stages.0.0.1.0.weight"], stages["stages.0.0.1.0.weight"])


def pretrained_mobilenet(path, steps: int = 40) -> dict:
    """mobilenet_v3_small trained briefly on mnist-sample's training split (its grey channel shown as
    RGB), batch-norm statistics then measured over the split; saved to ``path`` as a state dict."""
    from eefast.data import load_dataset

    torch.manual_seed(0)
    splits = load_dataset("mnist-sample", "data", seed=0, val_fraction=0.1, augment=False)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True)
    network = torchvision.models.mobilenet_v3_small(num_classes=10)
    optimizer = torch.optim.AdamW(network.parameters(), 2e-3)
    for step, (x, y) in zip(range(steps), loader):
        loss = nn.functional.cross_entropy(network(x.expand(-1, 3, -1, -1)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: the statistics of the batches below
    with torch.no_grad():
        for step, (x, _) in zip(range(10), loader):
            network(x.expand(-1, 3, -1, -1))
    state = network.state_dict()
    torch.save(state, path)
    return state


def test_train_exits_on_a_frozen_pretrained_backbone(tmp_path, capsys):
    """The issue's command: the exits train, the backbone stays the file's bit for bit, and the run
    reports accuracy, cost and the exit histogram; eval then rebuilds the model from its checkpoint."""
    weights = tmp_path / "mobilenet.pth"
    state = pretrained_mobilenet(weights)
    out = tmp_path / "run"
    assert cli.main(["train", "--backbone", "torchvision:mobilenet_v3_small", "--weights", str(weights),
                     "--freeze-backbone", "--epochs", "1", "--out", str(out), "--no-plots", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    test = summary["test"]
    assert test["accuracy"] > 60 and 0 < test["relative_cost"] < 1 and sum(test["exit_counts"]) == 1000
    assert sum(c > 0 for c in test["exit_counts"]) >= 2  # the exits are taken
    trained = model_from_checkpoint(load_checkpoint(out / "best.pt"))
    start = eefast.create_model("torchvision:mobilenet_v3_small", weights=str(weights), **MNIST)
    assert torch.equal(stage_state(start)["stages.0.0.1.0.weight"], state["features.0.0.weight"])
    assert stage_state(start).keys() == stage_state(trained).keys()
    assert all(torch.equal(v, stage_state(start)[k]) for k, v in stage_state(trained).items())
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "best.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == test["accuracy"]
