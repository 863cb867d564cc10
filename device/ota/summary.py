# ota.status(): one dict a person or a fleet server can read.
from ota import state, otadata, slots


def status():
    all_slots = slots.ota_slots()
    run = slots.running()
    version, secure = slots.read_app_desc(run)
    states = otadata.slot_states(len(all_slots), otadata.records())
    st = state.load()
    return {
        "version": version,
        "secure_version": secure,
        "slot": run.info()[4],
        "slots": dict((all_slots[i].info()[4], states.get(i, "UNDEFINED")) for i in range(len(all_slots))),
        "last_result": st["last_result"],
        "last_error": st["last_error"],
        "detail": st["detail"],
        "pending": st["pending"],
        "security_floor": st["floor"],
        "rejected": [r.get("version") for r in st["rejected"]],
        "retry_after": st.get("retry_after"),
        "progress": st.get("progress"),
        "rollback": st.get("rollback"),
        "backoff": st.get("backoff"),
    }
