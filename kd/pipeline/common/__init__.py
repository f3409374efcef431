"""What both stages need and neither owns: the dataset records and their validation, the
teacher-forcing rule that turns a record into token ids (teacher and student must agree on it),
the processors' extra inputs and how they batch, and the model directory's identity files."""
