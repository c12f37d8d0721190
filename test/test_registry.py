"""The name tables behind --model, --strategy and the local rules."""
import pytest

from configs.registry import Registry


def test_registry_lookup_duplicates_and_case():
    table = Registry("thing", case_insensitive=True)

    @table.register("FedX")
    class FedX:
        pass

    assert table.get("fedx") is FedX and table.get("FEDX") is FedX
    assert table.names() == ("FedX",)
    with pytest.raises(ValueError, match="registered twice"):
        table.register("fedx")(object)
    with pytest.raises(ValueError, match="unknown thing 'y'; expected one of FedX"):
        table.get("y")


def test_exact_registry_and_fill_hook():
    calls = []
    table = Registry("net", fill=lambda: calls.append(1))
    table.register("unet")(len)
    with pytest.raises(ValueError):
        table.get("UNet")
    assert table.get("unet") is len
    assert len(calls) == 3  # two lookups, plus the names listed in the first one's error
