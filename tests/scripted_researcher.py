"""TEST DOUBLE: the scripted researcher; it lives in rfs/rehearsal/ because `rfs rehearse` serves it too."""

from rfs.rehearsal.scripted_researcher import DIE, Refuse, ScriptedResearcher, Step, action  # noqa: F401
