"""The environments agents act in: the research task family (`research`, with its
scripted policy `research_policy`) and real shell workspaces (`workspace`)."""
