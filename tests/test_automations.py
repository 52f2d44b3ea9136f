"""The automations shipped in deploy/automations.yaml are valid and accepted by a Prefect server."""

from pathlib import Path
from uuid import uuid4

import yaml

AUTOMATIONS = Path(__file__).resolve().parents[1] / "deploy" / "automations.yaml"


def test_shipped_automations_are_created_on_a_server(prefect_server):
    from prefect import get_client
    from prefect.events.schemas.automations import AutomationCore

    text = AUTOMATIONS.read_text()
    text = text.replace("NOTIFY_BLOCK_ID", str(uuid4())).replace("RECONCILE_DEPLOYMENT_ID", str(uuid4()))
    automations = [AutomationCore.model_validate(a) for a in yaml.safe_load(text)["automations"]]

    with get_client(sync_client=True) as client:
        ids = [client.create_automation(a) for a in automations]
        stored = [client.read_automation(i) for i in ids]
    assert [a.trigger.expect for a in stored] == [{"mqi.case.failed"}, {"mqi.host.refused"}, {"mqi.host.reachable"}]
    assert [a.actions[0].type for a in stored] == ["send-notification", "send-notification", "run-deployment"]
