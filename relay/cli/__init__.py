"""The command line (`dicom-relay`): app wires the verbs, one module per group of them."""
