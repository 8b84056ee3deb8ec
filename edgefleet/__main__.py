from edgefleet.entry import entry

entry()
