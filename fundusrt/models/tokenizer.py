"""A small byte-level BPE tokenizer with the chat special tokens, for tests, tiny checkpoints and the demo.

Trained with the `tokenizers` library on a built-in ophthalmic corpus, so it needs no download and
round-trips any text (byte-level: unknown words fall back to byte tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Order fixes the ids 0..5; chat formats look them up by string, never by id.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")

OPHTHALMIC_CORPUS = """\
The optic disc is well defined with a cup-to-disc ratio of 0.3.
The cup-to-disc ratio is enlarged at 0.7, suspicious for glaucoma.
Scattered microaneurysms and dot-blot haemorrhages are seen in all four quadrants.
Hard exudates form a circinate ring temporal to the fovea.
Cotton wool spots are present along the superior arcade.
Neovascularisation of the disc is present: proliferative diabetic retinopathy.
No diabetic retinopathy. The macula is normal and the foveal reflex is present.
Mild non-proliferative diabetic retinopathy with a few microaneurysms.
Moderate non-proliferative diabetic retinopathy with haemorrhages and exudates.
Severe non-proliferative diabetic retinopathy: venous beading in two quadrants.
Soft drusen cluster at the macula, consistent with age-related macular degeneration.
Geographic atrophy involves the centre of the macula.
Retinal vessels show arteriovenous nicking and copper wiring in hypertensive retinopathy.
A central retinal vein occlusion gives flame haemorrhages in every quadrant.
A branch retinal artery occlusion whitens the inferior retina.
The image is of adequate quality; the field is centred on the macula.
The image is blurred and underexposed; please repeat the photograph.
Right eye (OD): findings as above. Left eye (OS): no abnormality detected.
Peripapillary atrophy surrounds the optic disc in this myopic fundus.
Tessellated fundus with a tilted disc, typical of high myopia.
Laser photocoagulation scars are visible in the mid periphery.
Papilloedema: the disc margins are blurred and the disc is swollen.
Pale optic disc suggests optic atrophy.
Retinal detachment with a horseshoe tear in the superotemporal periphery.
Grade: referable diabetic retinopathy. Refer to an ophthalmologist within four weeks.
Grade: no referable disease. Rescreen in twelve months.
Is there diabetic retinopathy? Yes. Is there glaucoma? No. Is the macula involved? No.
Describe the fundus photograph. What is the diagnosis? Which eye is this?
Findings: optic disc, cup, vessels, macula, fovea, periphery, haemorrhage, exudate, drusen.
Impression: diabetic macular oedema with hard exudates within one disc diameter of the fovea.
"""


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train the byte-level BPE tokenizer on the built-in corpus.

    Args:
        vocab_size: target size including the 256 byte tokens and the special tokens.

    Returns:
        a `tokenizers.Tokenizer` whose first ids are `SPECIAL_TOKENS`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(OPHTHALMIC_CORPUS.splitlines(), trainer=trainer)
    return tokenizer
