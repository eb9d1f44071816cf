print("dirtymig-bench: not yet")
